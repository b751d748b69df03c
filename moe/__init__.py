"""MoE: DeepSeek-V3 router, expert-parallel dispatch over physical slots, EPLB placement and rebalancing."""
