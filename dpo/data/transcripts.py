"""HH-RLHF transcripts and shared prompts: a ``\\n\\nHuman: ...\\n\\nAssistant: ...`` text as
messages, and two full conversations split into the prompt they share and their responses.

``dpo.data.formats`` reads ``implicit_prompt`` and prompt-less ``conversational`` rows with
them; ``dpo.data.render`` unwraps a prompt that holds a whole transcript.
"""
from __future__ import annotations

import re

from dpo.data.errors import RowProblem

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str, field: str) -> list[dict]:
    """Parse an HH-RLHF ``\\n\\nHuman: ...\\n\\nAssistant: ...`` transcript into messages."""
    pieces = HH_TURN.split(text)
    # pieces = [before the first turn, role, text, role, text, ...]
    if len(pieces) < 3 or pieces[0].strip():
        raise RowProblem("malformed", f"{field} is not a '\\n\\nHuman: ...' transcript")
    return [
        {"role": HH_ROLES[role], "content": content.strip(), "fields": ""}
        for role, content in zip(pieces[1::2], pieces[2::2])
    ]


def split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Split two full conversations into (prompt, chosen response, rejected response).

    The prompt is the messages both conversations share, cut back to the last shared assistant
    turn, so that each response starts with the assistant turn where they differ.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    for cut in range(shared, -1, -1):
        if _starts_assistant_turn(chosen, cut) and _starts_assistant_turn(rejected, cut):
            return chosen[:cut], chosen[cut:], rejected[cut:]
    raise RowProblem("malformed", "chosen and rejected share no prompt before an assistant turn")


def _starts_assistant_turn(messages: list[dict], index: int) -> bool:
    return index < len(messages) and messages[index]["role"] == "assistant"
