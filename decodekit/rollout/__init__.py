"""Tree-structured segment rollouts (TreePO): the rollout configuration and driver, width budgets and
early stops, the tree's records, and the RL helpers that read them (advantages)."""
