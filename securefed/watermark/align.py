"""Alignment: recover, from a suspect model's own weights, how a thief reparameterized it relative to the base model,
and read its carriers in the base model's coordinates.

Three steps, each fitted to the base model the key names, never to the key:
1. the residual stream's basis Q, with E_suspect ≈ E_base·Q for the embedding matrices: a permutation with signs
   (each base column matched one to one with the suspect column it correlates with most), or, in a family whose
   norms are RMSNorms read only by linear layers, any rotation (orthogonal Procrustes): with its scales folded into
   their readers, such a model computes the same function in any rotated basis of its residual stream;
2. for each norm's group of readers (anatomy.py), the order of each reader's rows (matched by the profile of their
   magnitudes, which neither a row's scale nor a column's scale changes), then the scale of every row and of every
   column, fitted jointly to the base's weights: X ≈ diag(d)·W·diag(s);
3. a LayerNorm read only by a head the base lacks: its scale from its shift's ratio to the base's shift.
A reader's weight in base coordinates is then diag(1/d)·(X·Qᵀ)·diag(1/s), and a norm's scale ±diag(Q·diag(γ)·Qᵀ)·s
(γ[π] with signs for a permutation). The fit leaves one
sign open: a norm's output and every row reading it may flip together (attention scores are even in their input;
a value row's flip is taken back by the output projection; a post-LN model's next norm takes back a flipped input).
The sign chosen is the one that keeps the scale positively correlated with the base's: fine-tuning moves a scale by a
few per cent, not through zero.

Because nothing here reads the key, alignment cannot manufacture a match: a fresh key's bits stay fair coins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import WatermarkError
from .anatomy import Anatomy, Group

_FITS = 6  # alternating least-squares passes for the row and column scales


@dataclass
class Alignment:
    """How the suspect's channels map onto the base's, and how to read its norms and readers in base coordinates."""

    basis: np.ndarray  # Q: the suspect's residual stream is the base's times Q (E_suspect ≈ E_base·Q)
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # per norm: its readers' column scale s
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # per reader: (order, scale d)

    def scale(self, norm: str, values: np.ndarray, base: np.ndarray) -> np.ndarray:
        """A norm's scale, read in the base's coordinates (`base`: its values in the base model)."""
        aligned = (self.basis**2 @ values) * self.scales[norm]  # the diagonal of Q·diag(γ)·Qᵀ, times s
        return aligned if aligned @ base >= 0 else -aligned

    def columns(self, values: np.ndarray) -> np.ndarray:
        """A reader's columns in the base's residual basis: X·Qᵀ."""
        return values @ self.basis.T

    def weight(self, name: str, group: Group, values: np.ndarray) -> np.ndarray:
        """A reader's weight in the base's coordinates."""
        order, d = self.rows[name]
        return self.columns(values[order]) / d[:, None] / self.scales[group.norm]

    def describe(self) -> str:
        """What alignment undid, for the verdict."""
        strongest = np.abs(self.basis).max(axis=1)
        rotated = bool(np.any(strongest < 0.99))
        source = np.abs(self.basis).argmax(axis=1)
        moved = int(np.sum(source != np.arange(len(source))))
        rows = sum(int(np.sum(order != np.arange(len(order)))) for order, _ in self.rows.values())
        flips = int(np.sum(self.basis[np.arange(len(source)), source] < 0)) * (not rotated) + sum(
            int(np.sum(s < 0)) for s in self.scales.values()) + sum(int(np.sum(d < 0)) for _, d in self.rows.values())
        factors = np.concatenate([np.abs(s) for s in self.scales.values()] or [np.ones(1)])
        largest = float(np.exp(np.max(np.abs(np.log(factors)))))
        parts = ["the residual stream rotated back" if rotated else
                 f"{moved} residual channels moved" if moved else "",
                 f"{flips} signs flipped" if flips else "",
                 f"{rows} reader rows moved" if rows else "",
                 f"scales up to ×{largest:.3g}" if largest > 1.01 else ""]
        return ", ".join(p for p in parts if p) or "nothing to undo"


def needed(anatomy: Anatomy, norms: Sequence[str], readers: Sequence[str]) -> list[str]:
    """The weights alignment reads for these norms and readers: the embedding, and every group they touch."""
    groups = _groups(anatomy, norms, readers)
    names = {anatomy.embedding} | {f"{g.norm}.weight" for g in groups} | {w for g in groups for w in g.readers}
    for norm in norms:
        if norm in anatomy.unread:
            names |= {f"{norm}.weight", f"{norm}.bias"}
    return sorted(names)


def align(anatomy: Anatomy, suspect: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
          norms: Sequence[str], readers: Sequence[str]) -> Alignment:
    """Fit the suspect's reparameterization relative to the base, for the groups these norms and readers need."""
    suspect_embedding, base_embedding = suspect[anatomy.embedding], base[anatomy.embedding]
    if suspect_embedding.shape != base_embedding.shape:
        raise WatermarkError(f"the suspect's embedding is {suspect_embedding.shape}, the base's "
                             f"{base_embedding.shape}: another model")
    match = _rotation if anatomy.rotations else _signed_permutation
    alignment = Alignment(match(suspect_embedding, base_embedding))
    for group in _groups(anatomy, norms, readers):
        _fit_group(alignment, group, suspect, base)
    for norm in norms:
        if norm in anatomy.unread:
            alignment.scales[norm] = _shift_scale(norm, suspect, base, alignment)
    return alignment


def _groups(anatomy: Anatomy, norms: Sequence[str], readers: Sequence[str]) -> list[Group]:
    chosen: dict[str, Group] = {}
    for norm in norms:
        group = anatomy.group_of_norm(norm)
        if group is None and norm in anatomy.unread:
            continue
        if group is None:
            raise WatermarkError(f"alignment does not know what reads {norm}")
        chosen[group.norm] = group
    for reader in readers:
        group = anatomy.group_of_reader(reader)
        if group is None:
            raise WatermarkError(f"alignment does not know which norm {reader} reads")
        chosen[group.norm] = group
    return list(chosen.values())


def _unit(columns: np.ndarray) -> np.ndarray:
    columns = columns - columns.mean(axis=0)
    return columns / np.maximum(np.linalg.norm(columns, axis=0), 1e-12)


def _signed_permutation(suspect: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Q as a permutation with signs: each base column matched one to one with the suspect column it correlates with
    most."""
    correlation = _unit(base).T @ _unit(suspect)
    rows, order = linear_sum_assignment(-np.abs(correlation))
    basis = np.zeros_like(correlation)
    basis[rows, order] = np.where(correlation[rows, order] < 0, -1.0, 1.0)
    return basis


def _rotation(suspect: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Q as the orthogonal matrix nearest to mapping the base's embedding onto the suspect's (Procrustes)."""
    u, _, vt = np.linalg.svd(base.T @ suspect)
    return u @ vt


def _profile(weight: np.ndarray) -> np.ndarray:
    """Rows' magnitude profiles with each column's scale removed: unchanged by row scales, column scales, signs."""
    magnitude = np.abs(weight)
    magnitude = magnitude / np.maximum(np.linalg.norm(magnitude, axis=0), 1e-12)
    return _unit(magnitude.T)  # centred, unit rows (as columns of the transpose)


def _fit_group(alignment: Alignment, group: Group, suspect: Mapping[str, np.ndarray],
               base: Mapping[str, np.ndarray]) -> None:
    """Row orders, then row scales d and the shared column scale s, by alternating least squares. The rows' own
    order competes too: whichever explains the suspect's weights better as the base's wins (a fine-tuned model's
    change can blur rows that are alike, and nothing then says they moved)."""
    xs, bs, matched = {}, {}, {}
    for name in group.readers:
        x = alignment.columns(suspect[name])
        b = base[name]
        if x.shape != b.shape:
            raise WatermarkError(f"{name} is {x.shape} in the suspect, {b.shape} in the base: another model")
        xs[name], bs[name] = x, b
        matched[name] = linear_sum_assignment(-(_profile(b).T @ _profile(x)))[1]
    identity = {name: np.arange(len(bs[name])) for name in group.readers}
    fits = [_scales(group, {n: xs[n][order[n]] for n in group.readers}, bs) + (order,)
            for order in (identity, matched)]
    error, d, s, order = min(fits, key=lambda fit: fit[0])
    for name in group.readers:
        alignment.rows[name] = (order[name], d[name])
    alignment.scales[group.norm] = s


def _scales(group: Group, xs: dict[str, np.ndarray], bs: dict[str, np.ndarray]
            ) -> tuple[float, dict[str, np.ndarray], np.ndarray]:
    """X ≈ diag(d)·B·diag(s) for every reader, s shared; the fit's squared error, d per reader, and s."""
    s = np.ones(bs[group.readers[0]].shape[1])
    d = {}
    for _ in range(_FITS):
        for name in group.readers:
            scaled = bs[name] * s
            d[name] = np.sum(xs[name] * scaled, axis=1) / np.maximum(np.sum(scaled**2, axis=1), 1e-30)
        numerator = sum(np.sum(xs[n] * d[n][:, None] * bs[n], axis=0) for n in group.readers)
        denominator = sum(np.sum((d[n][:, None] * bs[n]) ** 2, axis=0) for n in group.readers)
        s = numerator / np.maximum(denominator, 1e-30)
    # the gauge: a common factor between every row scale and the column scale is the norm's own scale
    shift = np.exp(np.mean([np.mean(np.log(np.maximum(np.abs(d[n]), 1e-30))) for n in group.gauge]))
    d = {name: value / shift for name, value in d.items()}
    error = sum(float(np.sum((xs[n] - d[n][:, None] * bs[n] * s * shift) ** 2)) for n in group.readers)
    return error, d, s * shift


def _shift_scale(norm: str, suspect: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                 alignment: Alignment) -> np.ndarray:
    """A LayerNorm whose reader the base lacks: its output's scale a moved its scale and shift alike, so a comes from
    the shift, and s = 1/a."""
    shift, base_shift = alignment.basis @ suspect[f"{norm}.bias"], base[f"{norm}.bias"]
    energy = float(base_shift @ base_shift)
    a = float(shift @ base_shift) / energy if energy > 1e-12 else 1.0
    if abs(a) < 1e-6:
        raise WatermarkError(f"{norm}: its shift is unrelated to the base's; cannot read its scale")
    return np.full(len(shift), 1 / a)
