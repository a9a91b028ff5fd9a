"""decodekit in TRL's ``GRPOTrainer``: ``rollout_func`` (tree rollouts or independent samples on the policy
being trained, ``rollout``) and ``TreePOTrainer`` (TreePO's segment-level advantages, ``trainer``; needs
``pip install 'decodekit[rl]'``)."""

from decodekit.integrations.trl.rollout import TREE_PATH, DecodekitRollout, rollout_func


def __getattr__(name: str):
    if name == "TreePOTrainer":  # imports trl: only when asked for
        from decodekit.integrations.trl.trainer import TreePOTrainer

        return TreePOTrainer
    raise AttributeError(name)


__all__ = ["TREE_PATH", "DecodekitRollout", "TreePOTrainer", "rollout_func"]
