"""Differential privacy: the Gaussian mechanism on what a seed method releases, and its accountant.

A seed method's global model is a function of a few thousand released numbers
per round (FedKSeed's per-seed totals, Ferret's pool coordinates, FedKRSO's
accumulators), so privatising it needs noise on those numbers, not on billions
of weights. Two settings, as in the literature:

client level (DP-FedAvg, McMahan et al. 2018)
    The server clips every client's whole contribution (the vector it reports,
    in the method's own coordinates) to L2 norm ``clip``, sums them, adds
    ``N(0, (sigma clip)^2)`` to every coordinate of the round's space (every seed
    of the pool, not only those someone used: which ones were used must not show)
    and divides by the expected number of clients. Adding or removing one client
    moves the sum by at most ``clip``; rounds sample ``m`` of ``N`` clients, so the
    accountant composes the Poisson-subsampled Gaussian mechanism with rate
    ``m / N`` (sampling without replacement, as the runners do, is the usual
    approximation of it). The clip happens on the server: a client cannot skip it.

example level (DP-ZO, arXiv 2401.04343; DPZero, ICML 2024)
    Inside a zeroth-order client every step's scalar ``g`` is the only thing the
    step learns from its batch: each example's own ``g_j`` is clipped to
    ``[-clip, clip]``, summed, noised with ``N(0, (sigma clip)^2)`` and divided by
    the batch size. Client ``c``'s accountant composes ``local_steps`` steps per
    round it takes part in, at rate ``batch_size / n_c``; each client's sigma is
    calibrated to its own data, so every data owner gets the target.

The accountant is Google's ``dp-accounting`` (the library behind TF Privacy):
it is an accountant only, with no training hooks to work around, and it offers
both the RDP accountant that DP-FedAvg and DPZero report and the tighter PLD one.

The noise comes from ``noise_seed``; at 0 (the default) a fresh secret from the
operating system that no config, ledger or log holds, because anyone who knows
the seed can subtract the noise. The ledger stores the noised values, so replay
is bitwise whatever the seed.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedseed.settings import ConfigError, setting

MODES = ("off", "client", "example")
ACCOUNTANTS = ("rdp", "pld")
CLIENT_TAG, EXAMPLE_TAG = 0xD9C1, 0xD9E1
# Opacus's orders from 1.6 up (below, the library's series does not converge); higher orders change no epsilon
# we calibrate for, and each one costs the accountant time
RDP_ORDERS = [1 + x / 10 for x in range(6, 100)] + list(range(12, 64))


@dataclass
class PrivacySection:
    """``[privacy]``: differential privacy for the released model (docs/privacy.md says how each mode works)."""

    mode: str = setting("off", "off; client: clip and noise each client's contribution on the server; example: "
                               "clip and noise each step's scalar inside a zeroth-order client", MODES)
    clip: float = setting(1.0, "L2 bound on one client's contribution (client) or |g| of one example (example)")
    noise_multiplier: float = setting(0.0, "sigma: noise standard deviation over clip; 0 = calibrated so the "
                                           "configured rounds spend target_epsilon")
    target_epsilon: float = setting(0.0, "epsilon the configured rounds spend (sets sigma; needs noise_multiplier 0)")
    delta: float = setting(1e-5, "delta of the (epsilon, delta) guarantee")
    max_epsilon: float = setting(0.0, "budget: stop before a round that would spend more (0 = none)")
    accountant: str = setting("rdp", "rdp (what DP-FedAvg and DPZero report) or pld (tighter)", ACCOUNTANTS)
    noise_seed: int = setting(0, "0 = a secret seed from the operating system; a fixed seed reproduces the noise, "
                                 "and lets anyone who knows it remove the noise: for tests only")

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def check(self) -> None:
        if not self.on:
            return
        if not self.clip > 0:
            raise ConfigError(f"`privacy.clip` must be > 0, got {self.clip}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"`privacy.delta` must be in (0, 1), got {self.delta}")
        for key in ("noise_multiplier", "target_epsilon", "max_epsilon"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"`privacy.{key}` must be >= 0, got {getattr(self, key)}")
        if (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ConfigError("set exactly one of `privacy.noise_multiplier` (sigma) and `privacy.target_epsilon` "
                              "(sigma calibrated to it)")
        if self.noise_seed < 0:
            raise ConfigError(f"`privacy.noise_seed` must be >= 0 (0 = secret), got {self.noise_seed}")
        _library()  # a missing accountant is a setup error before the run, not a crash after round 1


class PrivacyBudgetExceeded(ConfigError):
    """The next round would spend more than ``privacy.max_epsilon``; nothing of it was run."""


# -- the accountant ------------------------------------------------------------------


def _library():
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError("[privacy] needs Google's accountant: pip install 'fedseed[privacy]' "
                          "(or pip install dp-accounting)") from None
    logging.getLogger("absl").setLevel(logging.ERROR)  # its per-order convergence notes are not ours to show
    return dp_accounting


def _event(sigma: float, rate: float, steps: int):
    dp_accounting = _library()

    gaussian = dp_accounting.GaussianDpEvent(sigma)
    step = gaussian if rate >= 1 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _accountant(kind: str):
    dp_accounting = _library()
    return dp_accounting.rdp.RdpAccountant(RDP_ORDERS) if kind == "rdp" else dp_accounting.pld.PLDAccountant()


@functools.cache  # pure: clients with the same data size and schedule share one answer
def epsilon(kind: str, sigma: float, rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` compositions of the Gaussian mechanism (noise ``sigma`` x sensitivity) sampled at ``rate``."""
    if steps == 0:
        return 0.0
    accountant = _accountant(kind)
    accountant.compose(_event(sigma, rate, steps))
    return float(accountant.get_epsilon(delta))


@functools.cache  # pure, and a bisection of accountant runs: clients alike in (rate, steps) calibrate once
def calibrate(kind: str, target: float, rate: float, steps: int, delta: float) -> float:
    """The smallest sigma whose ``steps`` compositions at ``rate`` spend at most ``target``."""
    dp_accounting = _library()
    interval = dp_accounting.ExplicitBracketInterval(1e-2, 1e3)
    try:
        return float(dp_accounting.calibrate_dp_mechanism(lambda: _accountant(kind), lambda s: _event(s, rate, steps),
                                                          target, delta, interval, tol=1e-4))
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError):
        raise ConfigError(f"`privacy.target_epsilon` = {target} cannot be met with sigma up to 1000 over {steps} "
                          f"steps at sampling rate {rate:.4g}; raise the target or run fewer rounds") from None


def secret_or(seed: int) -> int:
    return seed if seed else secrets.randbits(63)


# -- client level --------------------------------------------------------------------


@dataclass
class ClientNoise:
    """The server's Gaussian mechanism over clients' contributions (module docstring, "client level")."""

    clip: float
    sigma: float
    expected_clients: int  # m: the sum is divided by the clients a round asks, not those that answered
    seed: int = 0  # 0: a fresh secret

    def __post_init__(self) -> None:
        self.seed = secret_or(self.seed)

    def aggregate(self, round: int, ids: Sequence[np.ndarray], rows: Sequence[np.ndarray],
                  space: np.ndarray) -> np.ndarray:
        """``(sum_i clip(rows_i) + noise) / m`` on every id of ``space`` (ascending): shape (len(space), width).

        ``ids[i]`` names the ids of client ``i``'s rows, all inside ``space``.
        """
        width = rows[0].shape[1] if rows else 1
        total = np.zeros((space.size, width))
        for own, values in zip(ids, rows):
            at = np.searchsorted(space, own)
            if not np.array_equal(space[np.minimum(at, space.size - 1)], own):
                raise ValueError(f"round {round}: a contribution names ids outside the round's space")
            norm = float(np.linalg.norm(values))
            scale = min(1.0, self.clip / norm) if norm > 0 else 1.0
            total[at] += scale * np.asarray(values, dtype=np.float64)
        rng = np.random.default_rng([self.seed, round, CLIENT_TAG])
        total += rng.normal(0.0, self.sigma * self.clip, size=total.shape)
        return total / self.expected_clients


# -- example level -------------------------------------------------------------------


@dataclass
class ExampleNoise:
    """A zeroth-order client's per-step mechanism (module docstring, "example level").

    ``sigma_for(n)`` is the client's sigma: the configured one, or calibrated so
    that ``steps_per_round`` steps in each of the client's ``rounds`` rounds, at rate
    ``batch_size / n``, spend the target.
    """

    section: PrivacySection
    batch_size: int
    steps_per_round: int
    rounds_of: dict[int, int] = field(default_factory=dict)  # client -> rounds it is scheduled for

    def rate(self, n: int) -> float:
        return min(1.0, self.batch_size / n)

    def sigma_for(self, client: int, n: int) -> float:
        s = self.section
        if s.noise_multiplier:
            return s.noise_multiplier
        steps = self.steps_per_round * max(1, self.rounds_of.get(client, 1))
        return calibrate(s.accountant, s.target_epsilon, self.rate(n), steps, s.delta)

    def epsilon(self, client: int, n: int, rounds: int) -> float:
        """Client ``client``'s epsilon after taking part in ``rounds`` rounds."""
        s = self.section
        return epsilon(s.accountant, self.sigma_for(client, n), self.rate(n), self.steps_per_round * rounds, s.delta)

    def stream(self, round: int, client: int) -> np.random.Generator:
        """The noise of one client's round: secret unless ``noise_seed`` is set."""
        return np.random.default_rng([secret_or(self.section.noise_seed), round, client, EXAMPLE_TAG])

    def scalar(self, per_example: np.ndarray, sigma: float, rng: np.random.Generator) -> float:
        """The step's released scalar: per-example values clipped, summed, noised, over the batch size."""
        c = self.section.clip
        noisy = float(np.clip(per_example, -c, c).sum()) + float(rng.normal(0.0, sigma * c))
        return noisy / per_example.size


# -- a run's plan --------------------------------------------------------------------


@dataclass
class Plan:
    """A run's privacy, resolved: the mechanisms its algorithms apply and the epsilon each round spends.

    ``schedule[r - 1]`` lists the clients round ``r`` asks (the seeded sample).
    """

    section: PrivacySection
    schedule: list[list[int]]
    num_clients: int
    client: ClientNoise | None = None
    example: ExampleNoise | None = None

    @property
    def rate(self) -> float:
        return len(self.schedule[0]) / self.num_clients if self.schedule else 1.0

    def scheduled(self, client: int, through: int) -> int:
        """Rounds ``1 .. through`` that ask ``client``."""
        return sum(client in clients for clients in self.schedule[:through])

    def spent(self, round: int, examples: dict[int, int]) -> dict[str, float]:
        """The metrics of the epsilon spent through ``round`` (example level: the largest over clients)."""
        s = self.section
        if self.client is not None:
            return {"epsilon": epsilon(s.accountant, self.client.sigma, self.rate, round, s.delta)}
        assert self.example is not None
        worst = max((self.example.epsilon(c, n, self.scheduled(c, round)) for c, n in examples.items()), default=0.0)
        return {"example_epsilon": worst}

    def check_budget(self, rounds: int, examples: dict[int, int]) -> None:
        """Raise :class:`PrivacyBudgetExceeded` unless ``rounds`` rounds fit ``max_epsilon``, naming what does fit."""
        s = self.section
        if not s.max_epsilon:
            return
        def spent(r: int) -> float:
            return next(iter(self.spent(r, examples).values()))

        total = spent(rounds)
        if total <= s.max_epsilon:
            return
        fits, over = 0, rounds  # epsilon grows with rounds: bisect for the most that fit
        while over - fits > 1:
            mid = (fits + over) // 2
            fits, over = (mid, over) if spent(mid) <= s.max_epsilon else (fits, mid)
        raise PrivacyBudgetExceeded(
            f"{rounds} rounds would spend epsilon {total:.3g} > privacy.max_epsilon {s.max_epsilon} "
            f"(delta {s.delta}); at most {fits} rounds fit. Lower federation.rounds, raise privacy.noise_multiplier "
            "or set privacy.target_epsilon instead")


def plan(section: PrivacySection, schedule: list[list[int]], num_clients: int, batch_size: int,
         local_steps: int) -> Plan | None:
    """The run's :class:`Plan` (None with privacy off); sigma calibrated here when a target is set."""
    if not section.on:
        return None
    out = Plan(section, schedule, num_clients)
    if section.mode == "client":
        sigma = section.noise_multiplier or calibrate(section.accountant, section.target_epsilon, out.rate,
                                                      len(schedule), section.delta)
        out.client = ClientNoise(section.clip, sigma, len(schedule[0]), section.noise_seed)
    else:
        rounds_of = {c: out.scheduled(c, len(schedule)) for c in range(num_clients)}
        out.example = ExampleNoise(section, batch_size, local_steps, rounds_of)
    return out
