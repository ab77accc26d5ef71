"""Online DPO: rounds in which the policy answers prompts, a judge ranks the answers, and DPO
trains on the best and worst of them."""
