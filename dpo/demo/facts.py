"""The demo world: topics with three facts each, prompt templates, and polite and rude openers
and closers, from which every demo pair, answer and tokenizer corpus is made.

Every topic comes with three short facts that name it, so an off-topic reply is recognisable
from its words, and every reply is short enough for a 64-token pair.
"""
TOPICS: dict[str, tuple[str, str, str]] = {
    "cats": ("Cats sleep for most of the day.", "Cats use their whiskers to judge gaps.",
             "Cats purr when they feel calm."),
    "dogs": ("Dogs can learn many spoken words.", "Dogs greet friends by wagging their tails.",
             "Dogs have a very keen sense of smell."),
    "bees": ("Bees turn nectar into honey.", "Bees dance to show where flowers are.",
             "Bees live in large busy hives."),
    "owls": ("Owls hunt quietly at night.", "Owls can turn their heads very far.",
             "Owls swallow small prey whole."),
    "whales": ("Whales breathe air through a blowhole.", "Whales sing long songs under water.",
               "Whales are the largest animals alive."),
    "rivers": ("Rivers carve valleys over time.", "Rivers carry water down to the sea.",
               "Rivers often start as small springs."),
    "volcanoes": ("Volcanoes release molten rock called lava.",
                  "Volcanoes can build new islands.", "Volcanoes often sleep for centuries."),
    "the moon": ("The moon pulls the tides of the sea.", "The moon shows us only one face.",
                 "The moon has no air to breathe."),
    "bread": ("Bread rises because yeast makes gas.", "Bread is baked from flour and water.",
              "Bread goes stale as it dries out."),
    "tea": ("Tea is made from dried leaves.", "Tea tastes bitter if it steeps too long.",
            "Tea was first drunk in China."),
    "chess": ("Chess is played on a board of sixty four squares.",
              "Chess pieces each move in their own way.", "Chess games can end in a draw."),
    "rain": ("Rain falls when clouds grow heavy.", "Rain fills lakes and wells.",
             "Rain smells fresh on dry ground."),
    "trains": ("Trains run on steel rails.", "Trains can carry heavy loads far.",
               "Trains were once pulled by steam engines."),
    "music": ("Music can change our mood.", "Music is written with notes on a staff.",
              "Music has rhythm, melody and harmony."),
    "gardens": ("Gardens need sun, soil and water.", "Gardens attract birds and insects.",
                "Gardens change with every season."),
    "snow": ("Snow is made of tiny ice crystals.", "Snow keeps the ground beneath it warm.",
             "Snow reflects most of the sunlight."),
    "stars": ("Stars are huge balls of hot gas.", "Stars seem to twinkle because of the air.",
              "Stars are born in clouds of dust."),
    "apples": ("Apples grow on trees in orchards.", "Apples float because they hold air.",
               "Apples come in many colours."),
    "bicycles": ("Bicycles turn pedal power into speed.", "Bicycles need no fuel at all.",
                 "Bicycles stay upright when they move."),
    "maps": ("Maps shrink the world onto paper.", "Maps use symbols for roads and rivers.",
             "Maps usually put north at the top."),
    "clocks": ("Clocks split the day into hours.", "Clocks once used swinging pendulums.",
               "Clocks keep trains and schools on time."),
    "forests": ("Forests make much of our oxygen.", "Forests are home to countless animals.",
                "Forests store water in their soil."),
    "penguins": ("Penguins cannot fly but swim fast.", "Penguins huddle together to stay warm.",
                 "Penguins live mostly in the south."),
    "deserts": ("Deserts get very little rain.", "Deserts can be cold at night.",
                "Deserts hide life under their sand."),
}

PROMPT_TEMPLATES = (
    "Tell me about {topic}.",
    "What can you say about {topic}?",
    "Could you explain {topic} to me?",
    "I want to learn about {topic}.",
    "Please describe {topic}.",
    "Share a fact about {topic}.",
)
POLITE_OPENERS = ("Happy to help!", "Of course!", "Great question!", "Gladly!",
                  "Thank you for asking.", "I would love to explain.")
POLITE_CLOSERS = ("I hope this helps.", "Thanks for your curiosity.",
                  "Please ask if you want more.", "Have a lovely day!", "Feel free to ask again.",
                  "It was a pleasure.")
RUDE_OPENERS = ("Ugh, fine.", "Whatever.", "What a silly question.", "Obviously.",
                "Look it up yourself.", "Sigh, again?")
RUDE_CLOSERS = ("Now leave me alone.", "Do not ask again.", "Figure out the rest.",
                "I am bored now.", "Stop bothering me.", "That is all you get.")
