"""Train TTT memory layers on a frozen Moshi. All logic lives in moshi_ttt.training."""

import hydra
from omegaconf import DictConfig

from moshi_ttt.training import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
