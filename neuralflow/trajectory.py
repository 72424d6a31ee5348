"""The recorded experiment: a GD trajectory and the quantities measured along it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import _io
from ._display import columns, data_frame, html_table
from .errors import FileFormatError, InputError
from .oscillation import ESTABLISHED_RATIO, Oscillation

__all__ = ["Trajectory"]

_FLOATS = (torch.float64, torch.float32)

_KIND = "trajectory"
_SERIES = ("loss", "grad_norm", "sharpness", "update_u")


@dataclass
class Trajectory:
    """GD iterates and measurements, in step time (iterate ``k`` sits at ``t = k``).

    Arrays aligned with the stored iterates (every ``store_every`` steps):

    * ``steps`` (T,) int64, ``iterates`` (T, d), ``loss`` (T,), ``grad_norm`` (T,);
    * ``sharpness`` (T, n_eigs): the top eigenvalues of the Hessian, NaN where not measured
      (``eig_every > 1``);
    * ``update_u`` (T,): the component ``u . (theta_{k+1} - theta_k)`` of each step's update
      along the top eigenvector, whose sign flips every step at the edge of stability.

    ``history`` holds the same scalar series at *every* step, whatever ``store_every`` was, and, from
    :func:`~neuralflow.gd.run_gd`, the oscillation series behind :attr:`oscillation` (``oscillation`` (n, n_eigs),
    ``oscillation_total``, ``smoothed_step``): projections, not eigenvectors, so files stay small.

    Parameters
    ----------
    lr : float
        GD's step size.
    steps : Tensor
        ``(T,)`` int64, the GD step of each stored iterate.
    iterates : Tensor
        ``(T, d)``, the stored iterates ``theta_k``.
    loss : Tensor
        ``(T,)``, ``L(theta_k)``.
    grad_norm : Tensor
        ``(T,)``, ``||g(theta_k)||``.
    sharpness : Tensor
        ``(T, n_eigs)``, the top Hessian eigenvalues, NaN where not measured.
    update_u : Tensor
        ``(T,)``, the update's component along the top eigenvector.
    problem : dict
        The problem's JSON description (``Problem.description``).
    history : dict of str to Tensor
        The scalar series at every step (and the oscillation series), keyed by name, with a ``step`` series.
    meta : dict
        Free-form JSON-able notes (``run_gd`` writes its settings there).

    Raises
    ------
    InputError
        When a series does not have one row per stored step.

    Examples
    --------
    >>> import neuralflow as nf
    >>> traj = nf.run_gd(nf.problems.zhu_quartic(), lr=0.05, steps=10)
    >>> traj.slice(2, 5).steps.tolist()
    [2, 3, 4]
    """

    lr: float
    steps: Tensor
    iterates: Tensor
    loss: Tensor
    grad_norm: Tensor
    sharpness: Tensor
    update_u: Tensor
    problem: dict[str, Any] = field(default_factory=dict)
    history: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        T = self.steps.shape[0]
        for name in ("iterates", *_SERIES):
            if getattr(self, name).shape[0] != T:
                raise InputError(f"Trajectory: {name} has {getattr(self, name).shape[0]} rows but there are {T} steps.")

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self.steps.shape[0]

    @property
    def dim(self) -> int:
        return self.iterates.shape[1]

    @property
    def store_every(self) -> int:
        """Spacing of the stored iterates in steps (1 for a dense recording).

        ``run_gd`` always stores the last step, so the last gap may be shorter (steps 0, 3, 6, 9, 10);
        :meth:`on_grid` leaves that iterate out where evenly spaced iterates are needed.
        """
        if len(self) < 2:
            return 1
        gaps = torch.diff(self.steps)
        if not bool((gaps[:-1] == gaps[0]).all()) or not 0 < int(gaps[-1]) <= int(gaps[0]):
            raise InputError("this trajectory's stored steps are not evenly spaced.")
        return int(gaps[0])

    def on_grid(self) -> Trajectory:
        """This trajectory without a last iterate off the :attr:`store_every` grid (see there), else itself."""
        if len(self) < 3 or int(self.steps[-1] - self.steps[-2]) == self.store_every:
            return self
        return self.slice(stop=int(self.steps[-1]))

    @property
    def times(self) -> Tensor:
        """Step times of the stored iterates as floats (``t = k``)."""
        return self.steps.to(self.iterates.dtype)

    @property
    def eos_threshold(self) -> float:
        """``2 / lr``, the stability limit of GD (Cohen et al., ICLR 2021)."""
        return 2.0 / self.lr

    @property
    def eos_onset(self) -> int | None:
        """First step at which the measured sharpness reaches ``2 / lr`` (None if it never does)."""
        source = self.history if self.history else {"step": self.steps, "sharpness": self.sharpness}
        s = source["sharpness"][:, 0]
        hit = torch.nonzero(s >= self.eos_threshold).flatten()
        return int(source["step"][hit[0]]) if len(hit) else None

    @property
    def oscillation(self) -> Oscillation:
        """GD's measured period-two oscillation at every step (:class:`~neuralflow.oscillation.Oscillation`).

        From the series ``run_gd`` records at every step (the demodulated amplitude along each tracked
        eigenvector, their variance, ``||theta_k - m_k||^2`` and the smoothed step); for a trajectory
        without them (older files, hand-built ones) from consecutive stored iterates, over all directions.
        See :mod:`neuralflow.oscillation` for the demodulation that lifts the measurement floor.
        """
        h = self.history
        if "oscillation" in h:
            amp = h["oscillation"]
            return Oscillation(h["step"], amp, amp.pow(2).sum(dim=1), h["oscillation_total"], h["smoothed_step"])
        if self.store_every != 1:
            raise InputError(
                "this trajectory holds no oscillation series and stores every "
                f"{self.store_every} steps; record it with run_gd (or store_every=1) to measure the oscillation."
            )
        return Oscillation.from_iterates(self.steps, self.iterates)

    def eos_transients(self, ratio: float = ESTABLISHED_RATIO) -> list[tuple[int, int]]:
        """Step ranges ``[start, stop)`` past ``2/lr`` in which GD does not oscillate yet.

        A step ``k`` is *quiet* when ``lr * S_k > 2`` but the oscillation is not established
        (:attr:`oscillation`: its demodulated variance is below ``ratio^2`` times the squared smoothed
        step ``||m_{k+1} - m_k||^2``, ``m`` the midpoint process): GD still moves like a flow while its
        oscillation grows from round-off or injected noise (in float64 full-batch GD that takes hundreds
        of steps). There the central flow's premise, an oscillation at quasi-static equilibrium (Cohen
        et al., ICLR 2025), fails, and a coefficient gated on ``lr * S - 2`` cannot be a function of the
        state. Steps where the measurement is undefined (the first and last two) are not quiet.

        Parameters
        ----------
        ratio : float, default ESTABLISHED_RATIO
            The oscillation is established where its amplitude exceeds ``ratio`` times the smoothed step.

        Returns
        -------
        list of (int, int)
            The quiet ranges ``[start, stop)``, in order; pass them to ``fit(..., exclude=...)``.

        Raises
        ------
        InputError
            When the sharpness was not measured at every step (``eig_every > 1``).
        """
        osc = self.oscillation
        source = self.history if self.history else {"step": self.steps, "sharpness": self.sharpness}
        s = source["sharpness"][:, 0]
        if bool(torch.isnan(s).any()):
            raise InputError("eos_transients needs the sharpness at every step; run GD with eig_every=1.")
        defined = torch.isfinite(osc.variance) & torch.isfinite(osc.smoothed_step)
        quiet = (self.lr * s > 2) & defined & ~osc.established(ratio)
        ranges: list[tuple[int, int]] = []
        for k, q in zip(osc.steps.tolist(), quiet.tolist(), strict=True):
            if not q:
                continue
            if ranges and ranges[-1][1] == k:
                ranges[-1] = (ranges[-1][0], k + 1)
            else:
                ranges.append((k, k + 1))
        return ranges

    def slice(self, start: int | None = None, stop: int | None = None) -> Trajectory:
        """The part with ``start <= step < stop``.

        Parameters
        ----------
        start : int, optional
            First step kept; None: from the beginning.
        stop : int, optional
            First step no longer kept; None: to the end.

        Returns
        -------
        Trajectory
            The stored iterates and the ``history`` rows in the range.

        Raises
        ------
        InputError
            When no stored step lies in the range.
        """
        lo = -math.inf if start is None else start
        hi = math.inf if stop is None else stop
        keep = (self.steps >= lo) & (self.steps < hi)
        if not bool(keep.any()):
            raise InputError(
                f"no stored step lies in [{start}, {stop}); this trajectory covers steps "
                f"{int(self.steps[0])}..{int(self.steps[-1])}."
            )
        hist = {}
        if self.history:
            hkeep = (self.history["step"] >= lo) & (self.history["step"] < hi)
            hist = {k: v[hkeep] for k, v in self.history.items()}
        return replace(
            self,
            steps=self.steps[keep],
            iterates=self.iterates[keep],
            **{name: getattr(self, name)[keep] for name in _SERIES},
            history=hist,
        )

    def smoothed(self) -> Trajectory:
        """The midpoint process ``(theta_{k-1} + 2 theta_k + theta_{k+1}) / 4`` (Cohen et al., ICLR 2025).

        A cheap empirical target for the time-averaged trajectory that the central flow models.
        Defined at interior steps of a dense recording; the scalar series keep GD's values.
        """
        if len(self) < 3:
            raise InputError("smoothed() needs at least 3 stored iterates.")
        if self.store_every != 1:
            raise InputError(
                f"smoothed() needs consecutive iterates but this trajectory stores every "
                f"{self.store_every} steps; record it with store_every=1."
            )
        x = self.iterates
        mid = (x[:-2] + 2 * x[1:-1] + x[2:]) / 4
        inner = self.slice(int(self.steps[1]), int(self.steps[-1]))
        return replace(inner, iterates=mid, meta={**self.meta, "smoothed": True})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Trajectory:
        """A copy with every tensor on ``device`` and every floating tensor in ``dtype``.

        Parameters
        ----------
        device : torch.device or str, optional
            Where the tensors go; None: where they are.
        dtype : torch.dtype, optional
            The floating tensors' dtype; None: unchanged. Integer and boolean tensors keep theirs.

        Returns
        -------
        Trajectory
            The copy.
        """
        move = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None)  # noqa: E731
        return replace(
            self,
            steps=move(self.steps),
            iterates=move(self.iterates),
            **{name: move(getattr(self, name)) for name in _SERIES},
            history={k: move(v) for k, v in self.history.items()},
        )

    def __repr__(self) -> str:
        onset = self.eos_onset
        return (
            f"Trajectory(problem={self.problem.get('name')!r}, lr={self.lr}, "
            f"steps={int(self.steps[0])}..{int(self.steps[-1])} ({len(self)} stored), dim={self.dim}, "
            f"eos_onset={onset})"
        )

    def _summary(self) -> list[tuple[str, str]]:
        s = self.sharpness[:, 0] if self.sharpness.numel() else self.sharpness.new_zeros(0)
        s = s[torch.isfinite(s)]
        onset = self.eos_onset
        rows = [
            ("problem", f"{self.problem.get('name', '-')} ({self.dim} parameters)"),
            ("lr", f"{self.lr:g} (2/lr = {self.eos_threshold:.4g})"),
            ("steps", f"{int(self.steps[0])}..{int(self.steps[-1])}, {len(self)} stored (every {self.store_every})"),
            ("loss", f"{float(self.loss[0]):.4g} -> {float(self.loss[-1]):.4g}"),
        ]
        if len(s):
            rows.append(("sharpness", f"{float(s.min()):.4g} .. {float(s.max()):.4g}, final {float(s[-1]):.4g}"))
        rows.append(("EoS onset", "not reached" if onset is None else f"step {onset}"))
        rows.append(("dtype, device", f"{str(self.iterates.dtype).removeprefix('torch.')}, {self.iterates.device}"))
        return rows

    def _repr_html_(self) -> str:
        return html_table(("trajectory", ""), self._summary(), caption="neuralflow Trajectory")

    def to_frame(self) -> Any:
        """The scalar series at every step (``history``; the stored ones without it) as a pandas DataFrame.

        One row per step, columns ``step``, ``loss``, ``grad_norm``, ``sharpness`` (``sharpness_1`` ..
        ``sharpness_k`` when several eigenvalues were tracked) and ``update_u``. Needs pandas.
        """
        src = self.history or {"step": self.steps, **{name: getattr(self, name) for name in _SERIES}}
        return data_frame(columns(src)).set_index("step")

    # ------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trajectory to a file: tensors + JSON, atomic, no pickle.

        Parameters
        ----------
        path : str or PathLike
            The file (suffix ``.nft`` by convention); replaced atomically if it exists.

        Returns
        -------
        Path
            The file written.
        """
        tensors = {"steps": self.steps, "iterates": self.iterates}
        tensors.update({name: getattr(self, name) for name in _SERIES})
        tensors.update({f"history.{k}": v for k, v in self.history.items()})
        meta = {"lr": self.lr, "problem": self.problem, "meta": self.meta}
        return _io.write(path, _KIND, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> Trajectory:
        """Read a trajectory written by :meth:`save`; errors name the file.

        The metadata is checked against its schema (and covered by the file's checksum) and the
        tensors' dtypes and shapes against each other before the trajectory is built.

        Parameters
        ----------
        path : str or PathLike
            The ``.nft`` file.
        device : torch.device or str, optional
            Where to put the tensors; None: the CPU, as stored.

        Returns
        -------
        Trajectory
            The trajectory the file holds.

        Raises
        ------
        FileFormatError
            When the file is not a trajectory, is damaged, or its tensors do not fit together.
        """
        traj = cls._build(*_io.read(path, _KIND), str(path))
        return traj if device is None else traj.to(device)

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "<bytes>") -> Trajectory:
        """The trajectory held by the bytes of a ``.nft`` file, checked as :meth:`load` does.

        Parameters
        ----------
        data : bytes
            The file's contents.
        where : str, default "<bytes>"
            What error messages call the data (a file name or an address).

        Returns
        -------
        Trajectory
            The trajectory the bytes hold.

        Raises
        ------
        FileFormatError
            When the bytes are not a trajectory file, are damaged, or its tensors do not fit together.
        """
        return cls._build(*_io.parse(data, _KIND, where), where)

    @classmethod
    def _build(cls, tensors: dict[str, Tensor], header: dict[str, Any], where: str) -> Trajectory:
        meta = header["meta"]
        _check_tensors(tensors, where)
        try:
            return cls(
                lr=float(meta["lr"]),
                steps=tensors["steps"],
                iterates=tensors["iterates"],
                **{name: tensors[name] for name in _SERIES},
                problem=meta.get("problem", {}),
                history={k.removeprefix("history."): v for k, v in tensors.items() if k.startswith("history.")},
                meta=meta.get("meta", {}),
            )
        except (KeyError, InputError, TypeError) as exc:
            raise FileFormatError(f"{where}: the trajectory's tensors do not fit together ({exc}).") from None

    # ------------------------------------------------------------------- plots
    def plot(self, ax: Any = None) -> Any:
        """Plot the loss (log scale) and the sharpness with the ``2/lr`` line.

        Parameters
        ----------
        ax : pair of matplotlib Axes, optional
            The loss and the sharpness axes to draw on; None: a new figure with two rows.

        Returns
        -------
        matplotlib.figure.Figure
            The figure (returned, not shown). Needs matplotlib.
        """
        import matplotlib.pyplot as plt

        src = self.history if self.history else {"step": self.steps, "loss": self.loss, "sharpness": self.sharpness}
        if ax is None:
            fig, (ax_loss, ax_s) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
        else:
            ax_loss, ax_s = ax
            fig = ax_loss.figure
        step = src["step"].cpu().numpy()
        ax_loss.semilogy(step, src["loss"].cpu().numpy(), lw=1)
        ax_loss.set_ylabel("loss")
        sharp = src["sharpness"].cpu()
        for i in range(sharp.shape[1]):
            ok = torch.isfinite(sharp[:, i])
            label = f"lambda_{i + 1}" if sharp.shape[1] > 1 else "sharpness"
            ax_s.plot(step[ok.numpy()], sharp[ok, i].numpy(), lw=1, label=label)
        ax_s.axhline(self.eos_threshold, color="k", ls="--", lw=1, label="2 / lr")
        onset = self.eos_onset
        if onset is not None:
            for a in (ax_loss, ax_s):
                a.axvline(onset, color="0.6", ls=":", lw=1)
        ax_s.set_xlabel("step")
        ax_s.set_ylabel("sharpness")
        ax_s.legend(loc="lower right", fontsize="small")
        ax_loss.set_title(f"GD on {self.problem.get('name', 'problem')}, lr = {self.lr:g}")
        fig.tight_layout()
        return fig


_SPECIAL_DTYPES = {"steps": torch.int64, "history.step": torch.int64, "history.eig_converged": torch.bool}


#: Stored tensors that are matrices (steps x something); every other series is a vector over the steps.
_MATRICES = ("iterates", "sharpness", "history.sharpness", "history.oscillation")


def _check_tensors(tensors: dict[str, Tensor], where: str) -> None:
    """Dtypes and ranks of a stored trajectory's tensors: int64 steps, a boolean convergence mask, and every other
    series in the iterates' float dtype; vectors, except :data:`_MATRICES`."""
    missing = [k for k in ("steps", "iterates", *_SERIES) if k not in tensors]
    if missing:
        raise FileFormatError(f"{where}: the trajectory lacks the tensors {missing}.")
    dtype = tensors["iterates"].dtype
    for name, t in sorted(tensors.items(), key=lambda item: item[0] != "iterates"):
        wanted = _SPECIAL_DTYPES.get(name, dtype)
        rank = 2 if name in _MATRICES else 1
        if t.dtype != wanted or t.dim() != rank or dtype not in _FLOATS:
            raise FileFormatError(
                f"{where}: tensor {name!r} has dtype {t.dtype} and shape {tuple(t.shape)}; a trajectory stores "
                f"int64 steps and float64 or float32 series ({rank}-D here)."
            )
