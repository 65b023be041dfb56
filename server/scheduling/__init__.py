"""When and together with what a request runs: the direct scheduler, the dynamic batcher around the
pure batch planner, and the opt-in response cache."""
