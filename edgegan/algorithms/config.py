"""Hyper-parameters every algorithm shares, so all of them are trained with the same recipe."""

from __future__ import annotations

from dataclasses import dataclass

from edgegan.models import ModelSpec, check_discriminator

LOSSES = ("ns", "hinge", "wgan-gp")
DEVICE_OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("none", "sgd", "adam")


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """One GAN recipe. Devices train discriminators; the server (or a device, in FedGAN) trains G.

    `device_*` fields act on discriminators where the data lives; `server_*` on the aggregate of their
    parameter deltas (FedOpt: the server optimiser treats minus the mean delta as a gradient);
    `g_*` on the generator.
    """

    loss: str = "wgan-gp"
    gp_weight: float = 0.1
    batch_size: int = 32  # real (and fake) examples per device per discriminator step
    local_steps: int = 1  # discriminator steps per device per round (FedGAN: GAN steps per round)
    device_opt: str = "sgd"
    device_lr: float = 0.1
    server_opt: str = "none"
    server_lr: float = 1.0
    aggregate: str = "mean"
    g_lr: float = 1e-4
    g_beta1: float = 0.5
    g_beta2: float = 0.9
    g_batch_size: int = 128
    g_steps: int = 1  # generator steps each time the generator is updated
    critic_ratio: int = 1  # discriminator rounds per generator update
    # Decay per round of the generator's exponential moving average, which is what gets evaluated and
    # saved when on (edgegan/runsetup.py RunRecorder); 0 = off, the generator itself.
    g_ema: float = 0.0
    mdgan_batches: int = 0  # MD-GAN's k; 0 means ceil(ln N) as in the paper, at least 1
    mdgan_swap_epochs: float = 1.0  # MD-GAN's E: swap discriminators every E local epochs
    # The discriminator's model is part of the recipe, so that every device builds it from the run's
    # configuration: its width (0: the run's width) and its normalisation (edgegan/models.py).
    d_width: int = 0
    d_norm: str = "none"
    # DP-SGD on the devices' discriminator steps (edgegan/algorithms/privatesgd.py, docs/privacy.md): each
    # real example's gradient clipped to dp_clip (0: DP off, the plain step), Gaussian noise of std
    # dp_noise * dp_clip on their sum. dp_epsilon is each device's budget at dp_delta (0: no budget): a
    # device whose next round would pass it stops contributing. Configs from before these decode as off.
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_delta: float = 1e-5
    dp_epsilon: float = 0.0
    # Central (user-level) DP at the server (edgegan/algorithms/privacy.py, docs/privacy.md): each device's
    # change to the global discriminator clipped to central_dp_clip (0: off), the sum over the round divided
    # by the updates a round expects, Gaussian noise of std central_dp_noise * central_dp_clip / expected.
    central_dp_clip: float = 0.0
    central_dp_noise: float = 0.0

    @property
    def private(self) -> bool:
        """Whether the devices' discriminator steps are DP-SGD steps."""
        return self.dp_clip > 0

    @property
    def centrally_private(self) -> bool:
        """Whether the server folds the devices' discriminators under central DP."""
        return self.central_dp_clip > 0

    def __post_init__(self) -> None:
        # Import here: aggregation imports this module for its type.
        from edgegan.algorithms.aggregation import parse_aggregate

        checks = [
            (self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"),
            (self.device_opt in DEVICE_OPTIMIZERS, f"device_opt must be one of {DEVICE_OPTIMIZERS}"),
            (self.server_opt in SERVER_OPTIMIZERS, f"server_opt must be one of {SERVER_OPTIMIZERS}"),
            (self.gp_weight >= 0, "gp_weight must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.g_batch_size >= 1, "g_batch_size must be >= 1"),
            (self.local_steps >= 1, "local_steps must be >= 1"),
            (self.g_steps >= 1, "g_steps must be >= 1"),
            (self.critic_ratio >= 1, "critic_ratio must be >= 1"),
            (self.device_lr > 0 and self.server_lr > 0 and self.g_lr > 0, "learning rates must be > 0"),
            (0 <= self.g_beta1 < 1 and 0 <= self.g_beta2 < 1, "betas must be in [0, 1)"),
            (0 <= self.g_ema < 1, f"g_ema must be in [0, 1), got {self.g_ema}"),
            (self.mdgan_batches >= 0, "mdgan_batches must be >= 0"),
            (self.mdgan_swap_epochs > 0, "mdgan_swap_epochs must be > 0"),
            (self.dp_clip >= 0, f"dp_clip must be >= 0 (0: DP off), got {self.dp_clip}"),
            (self.dp_noise >= 0, f"dp_noise must be >= 0, got {self.dp_noise}"),
            (self.dp_noise == 0 or self.private, "dp_noise needs dp_clip > 0: noise is scaled by the clip"),
            (0 < self.dp_delta < 1, f"dp_delta must be in (0, 1), got {self.dp_delta}"),
            (self.dp_epsilon >= 0, f"dp_epsilon must be >= 0 (0: no budget), got {self.dp_epsilon}"),
            (
                self.dp_epsilon == 0 or self.dp_noise > 0,
                "dp_epsilon (a budget) needs dp_noise > 0: without noise epsilon is infinite",
            ),
            (self.central_dp_clip >= 0, f"central_dp_clip must be >= 0 (0: off), got {self.central_dp_clip}"),
            (self.central_dp_noise >= 0, f"central_dp_noise must be >= 0, got {self.central_dp_noise}"),
            (
                self.central_dp_noise == 0 or self.centrally_private,
                "central_dp_noise needs central_dp_clip > 0: noise is scaled by the clip",
            ),
            (
                not self.centrally_private or self.aggregate == "mean",
                "central DP folds a clipped mean: it needs --aggregate mean, got " + repr(self.aggregate),
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_aggregate(self.aggregate)
        check_discriminator(self.d_width, self.d_norm)

    def model_spec(self, sample_shape: tuple[int, ...], latent_dim: int, width: int) -> ModelSpec:
        """The run's networks: its data shape, noise size and width, with this recipe's discriminator."""
        return ModelSpec(tuple(sample_shape), latent_dim, width, d_width=self.d_width, d_norm=self.d_norm)
