"""Train TTT memory layers on a frozen Moshi. All logic lives in moshi_ttt.training.

A bad setting stops before any compute with one line naming the key and exit status 2
(HYDRA_FULL_ERROR=1 keeps the traceback); `python train.py --help` documents every key.
"""

import sys

import hydra
from omegaconf import DictConfig

from moshi_ttt.config.errors import exit_on_bad_setting, run_cli


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_bad_setting():
        from moshi_ttt.training import train  # torch & co. only once the config composed

        train(cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))
