"""Train TTT memory layers on a frozen Moshi. All logic lives in moshi_ttt.training.

A bad setting stops before any compute with one line naming the key and exit status 2
(HYDRA_FULL_ERROR=1 keeps the traceback); `python train.py --help` documents every key.
"""

import sys

from moshi_ttt import signals

signals.arm("SIGUSR1")  # SLURM's early warning may come while torch is still importing

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from moshi_ttt.config.errors import exit_on_bad_setting, run_cli  # noqa: E402


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with exit_on_bad_setting():
        from moshi_ttt.training import train  # torch & co. only once the config composed

        train(cfg)


if __name__ == "__main__":
    sys.exit(run_cli(main))
