"""Real datasets mmfuse builds offline from installed system packages.

from mmfuse.data.datasets import emoji_dataset
root = emoji_dataset()   # $MMFUSE_HOME/datasets/emoji-v1 with train.csv, val.csv, test.csv
"""

from mmfuse.data.datasets.emoji import MissingPackagesError, build_emoji, emoji_dataset

__all__ = ["MissingPackagesError", "build_emoji", "emoji_dataset"]
