"""Every approximation a flow's derivation makes, as data, in one place.

An :class:`Approximation` names what a derivation dropped or assumed, the regime where that is exact, and the
candidate correction terms (:data:`~neuralflow.corrections.TERMS`) that would repair it. The flows list theirs in
``flow.approximations``; a correction term names the one it repairs (``TermSpec.approximation``); the report
turns a fitted coefficient into "revise this approximation". :data:`APPROXIMATIONS` holds them all by name.
A new flow or term adds its records here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Approximation",
    "APPROXIMATIONS",
    "CONTINUOUS_TIME_1",
    "NO_OSCILLATION",
    "CONTINUOUS_TIME_2",
    "CONTINUOUS_TIME_3",
    "NO_THIRD_DERIVATIVES",
    "REAL_PART",
    "UNRESOLVED_GRADIENT_FLOW",
    "QUASI_STATIC_OSCILLATION",
    "CRITICAL_SUBSPACE",
    "SECOND_ORDER_OSCILLATION",
    "SINGLE_CRITICAL",
    "LINEAR_FLOQUET_GROWTH",
    "TRACKED_SUBSPACE",
    "ADIABATIC_EIGENVECTORS",
    "CONTINUOUS_TIME_OFF_TRACKED",
    "MODIFIED_OFF_TRACKED",
    "CONTINUOUS_TIME_COUPLING",
    "ISOTROPIC_INJECTION",
    "EFFECTIVE_STEP_SIZE",
    "NO_OSCILLATION_CRITICAL",
    "SLAVED_TOP_DIRECTION",
]


@dataclass(frozen=True)
class Approximation:
    """One named approximation made in deriving a flow.

    ``name`` is a slug; ``statement`` one sentence a researcher would write in a paper;
    ``exact_when`` the order or regime in which it is exact; ``revised_by`` the names of the
    candidate correction terms (:data:`~neuralflow.corrections.TERMS`) that would repair it; ``reference`` where
    the derivation is written down.
    """

    name: str
    statement: str
    exact_when: str
    revised_by: tuple[str, ...]
    reference: str

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "statement": self.statement,
            "exact_when": self.exact_when,
            "revised_by": list(self.revised_by),
            "reference": self.reference,
        }


# --------------------------------------------------------------------------- gradient flow (neuralflow.flows.gradient)

CONTINUOUS_TIME_1 = Approximation(
    name="continuous-time-order-1",
    statement="GD's discrete steps are replaced by their continuous-time limit, dropping the "
    "first-order backward-error term -(1/2) lr^2 H g.",
    exact_when="lr -> 0, to O(lr^2) per step",
    revised_by=("Hg",),
    reference="Barrett & Dherin, Implicit Gradient Regularization, ICLR 2021; Hairer, Lubich, Wanner, ch. IX",
)

NO_OSCILLATION = Approximation(
    name="no-oscillation",
    statement="The iterates do not oscillate along the top Hessian eigenvector, so the "
    "oscillation's curvature-lowering drift -(1/2) lr sigma^2 grad S is absent.",
    exact_when="sharpness below 2/lr (the stable regime)",
    revised_by=("gradS", "gradScrit"),
    reference="Cohen, Damian, Talwalkar, Kolter, Lee, Understanding Optimization in Deep Learning with "
    "Central Flows, ICLR 2025",
)

# -------------------------------------------------------------------------- modified flows (neuralflow.flows.modified)

_HLW = "Hairer, Lubich, Wanner, Geometric Numerical Integration, ch. IX (modified equation of explicit Euler)"

CONTINUOUS_TIME_2 = Approximation(
    name="continuous-time-order-2",
    statement="GD's discrete steps are replaced by their modified equation truncated after the first-order "
    "term, dropping the second-order backward-error terms -lr^3 (1/3 H^2 g + 1/12 D3L[g, g]).",
    exact_when="lr -> 0, to O(lr^3) per step",
    revised_by=("H2g", "D3gg"),
    reference=_HLW,
)

CONTINUOUS_TIME_3 = Approximation(
    name="continuous-time-order-3",
    statement="GD's discrete steps are replaced by their modified equation truncated after the second-order "
    "terms, dropping every O(lr^4) backward-error term.",
    exact_when="lr -> 0, to O(lr^4) per step",
    revised_by=(),
    reference=_HLW,
)

# ------------------------------------------------------------------------- principal flow (neuralflow.flows.principal)

_RWQD = (
    "Rosca, Wu, Qin, Dherin, On a continuous time model of gradient descent dynamics and instability in deep "
    "learning, TMLR 2023"
)

NO_THIRD_DERIVATIVES = Approximation(
    name="no-third-derivatives",
    statement="The loss is treated as locally quadratic (the Hessian does not change along a step), dropping "
    "every third-derivative term of GD's modified equation, starting with -(1/12) lr^3 D3L[g, g].",
    exact_when="quadratic losses (constant Hessian)",
    revised_by=("D3gg",),
    reference=_RWQD,
)

REAL_PART = Approximation(
    name="real-part",
    statement="Where lr lambda > 1, GD's per-step factor 1 - lr lambda is negative and its logarithm complex; "
    "only the real part log|1 - lr lambda| is kept, dropping the period-2 flip along those eigenvectors.",
    exact_when="lr lambda_max < 1",
    revised_by=("gradS", "u_ug"),
    reference=_RWQD,
)

UNRESOLVED_GRADIENT_FLOW = Approximation(
    name="unresolved-directions-gradient-flow",
    statement="Outside the top-k Hessian eigenspace the flow is gradient flow -lr g, dropping the backward-error "
    "terms -(1/2) lr^2 H g, ... in the unresolved directions.",
    exact_when="k = None (every direction resolved) or lr lambda small outside the top-k eigenspace",
    revised_by=("Hg",),
    reference=_RWQD,
)

# ----------------------------------------------------------------------------- central flow (neuralflow.flows.central)

_CDTKL = (
    "Cohen, Damian, Talwalkar, Kolter, Lee, Understanding Optimization in Deep Learning with Central Flows, ICLR 2025"
)

QUASI_STATIC_OSCILLATION = Approximation(
    name="quasi-static-oscillation",
    statement="GD's oscillation across the valley is slaved to the slow motion: its covariance Sigma is set "
    "instantly to the value that holds the critical eigenvalues at 2/lr, so the time-averaged iterate follows "
    "-lr [g + 1/2 grad <H, Sigma>] with no transient (e.g. the growth of the oscillation at EoS onset).",
    exact_when="after the EoS onset transient, when the oscillation is in equilibrium",
    revised_by=("gradS", "gradScrit"),
    reference=_CDTKL,
)

CRITICAL_SUBSPACE = Approximation(
    name="critical-subspace",
    statement="GD oscillates only along the Hessian eigenvectors whose eigenvalues are critical (at least "
    "1.95/lr); the dynamics of every other eigendirection, including the slaved top-eigendirection motion, "
    "is that of gradient flow.",
    exact_when="a clear gap between the critical eigenvalues and the rest of the spectrum",
    revised_by=("gradScrit", "u_ug"),
    reference=_CDTKL,
)

SECOND_ORDER_OSCILLATION = Approximation(
    name="second-order-oscillation",
    statement="The effect of the oscillation on the time-averaged gradient is expanded to second order in its "
    "amplitude (1/2 grad <H, Sigma>, a third-derivative term), dropping higher moments of the oscillation.",
    exact_when="small oscillations (sigma^2 lambda small against the loss scale)",
    revised_by=("gradS",),
    reference=_CDTKL,
)

SINGLE_CRITICAL = Approximation(
    name="single-critical-eigenvalue",
    statement="Only the top Hessian eigenvalue can be critical: the oscillation is along the top eigenvector u "
    "alone, Sigma = sigma^2 u u^T.",
    exact_when="an isolated top eigenvalue (e.g. scalar-output nets)",
    revised_by=("gradScrit",),
    reference=_CDTKL,
)

# --------------------------------------------------------------------- oscillation flow (neuralflow.flows.oscillation)

_SCIENCE = (
    "Damian, Nichani, Lee, Self-Stabilization, ICLR 2023 (sec. 4); Cohen, Damian, Talwalkar, Kolter, Lee, "
    "Central Flows, ICLR 2025; derived together in neuralflow's science notes, section 7"
)

LINEAR_FLOQUET_GROWTH = Approximation(
    name="linear-floquet-growth",
    statement="The oscillation's variance along each tracked eigenvector grows or decays at the linearised rate "
    "2 log|1 - lr lambda_i| per step, whatever its amplitude; a finite amplitude shifts the effective curvature "
    "the oscillation feels (GD hovers a little above 2/lr at the edge of stability).",
    exact_when="infinitesimal oscillations (quiet stretch, onset of a catapult)",
    revised_by=("gradScrit",),
    reference=_SCIENCE,
)

TRACKED_SUBSPACE = Approximation(
    name="oscillation-in-tracked-subspace",
    statement="GD's oscillation lies in the span of the tracked top-k Hessian eigenvectors; a direction outside "
    "them carries no oscillation and one that leaves the tracked set is reset to its floor.",
    exact_when="a gap between the tracked eigenvalues and the rest of the spectrum",
    revised_by=("gradScrit", "u_ug"),
    reference=_SCIENCE,
)

ADIABATIC_EIGENVECTORS = Approximation(
    name="adiabatic-eigenvectors",
    statement="The tracked eigenvectors turn slowly against the oscillation's period (two steps), so the "
    "covariance is carried into the new eigenbasis by a rotation, with no transfer between directions.",
    exact_when="eigenvectors that rotate little per step (no near-crossing with an untracked eigenvalue)",
    revised_by=("u_ug",),
    reference=_SCIENCE,
)

CONTINUOUS_TIME_OFF_TRACKED = Approximation(
    name="continuous-time-off-tracked",
    statement="Off the tracked eigenvectors GD's discrete steps are replaced by their continuous-time limit, "
    "dropping the first-order backward-error term -(1/2) lr^2 P H g (P = I - U U^T); along them the Floquet rate "
    "log|1 - lr lambda| is already GD's per-step factor.",
    exact_when="lr lambda -> 0 for the untracked eigenvalues, to O(lr^2) per step",
    revised_by=("PHg", "Hg"),
    reference=_HLW + "; " + _SCIENCE,
)

MODIFIED_OFF_TRACKED = Approximation(
    name="modified-equation-off-tracked",
    statement="Off the tracked eigenvectors GD's discrete steps are replaced by their modified equation truncated "
    "after the first-order term -(1/2) lr^2 P H g, dropping the second-order terms; the modified equation is not "
    "applied along the tracked eigenvectors, where lr lambda ~ 2 and its series does not converge.",
    exact_when="lr lambda -> 0 for the untracked eigenvalues, to O(lr^3) per step",
    revised_by=("PHg", "H2g", "D3gg"),
    reference=_HLW + "; " + _SCIENCE,
)

CONTINUOUS_TIME_COUPLING = Approximation(
    name="continuous-time-coupling",
    statement="The oscillation's couplings act at the current state: its growth at the current curvature and the "
    "drift at the current covariance. GD's map applies the curvature of step k for the whole step and its drift "
    "sees the oscillation of step k, so both run half a step behind (an explicit Euler solve in substeps h already "
    "lags h/2 of it).",
    exact_when="curvature and covariance that change little per step (away from a catapult)",
    revised_by=("lag",),
    reference=_SCIENCE,
)

ISOTROPIC_INJECTION = Approximation(
    name="isotropic-constant-injection",
    statement="The variance that seeds the oscillation (injected noise, float round-off) is the same constant q "
    "per step along every direction.",
    exact_when="isotropic Gaussian noise of fixed size; round-off only on average",
    revised_by=(),
    reference=_SCIENCE,
)

# ------------------------------------------ approximations only a correction term names (neuralflow.corrections.TERMS)

EFFECTIVE_STEP_SIZE = Approximation(
    name="effective-step-size",
    statement="The drift along -g proceeds at exactly the nominal step size lr.",
    exact_when="always for GD's own update; broken by averaging or rescaled dynamics",
    revised_by=("g",),
    reference="Cohen, Kaur, Li, Kolter, Talwalkar, ICLR 2021 (step size as the only time scale)",
)

NO_OSCILLATION_CRITICAL = Approximation(
    name="no-oscillation-critical-subspace",
    statement="The iterates do not oscillate in the subspace of critical Hessian eigenvectors (eigenvalues "
    ">= 1.95/lr), so the drift -(1/2) lr grad <H, Sigma> is absent.",
    exact_when="sharpness below 2/lr; several eigenvalues at 2/lr break it together",
    revised_by=("gradScrit",),
    reference=NO_OSCILLATION.reference,
)

SLAVED_TOP_DIRECTION = Approximation(
    name="slaved-top-direction",
    statement="The motion along the top Hessian eigenvector is slaved to the gradient, with no dynamics of its own.",
    exact_when="far below the edge of stability",
    revised_by=("u_ug",),
    reference="Damian, Nichani, Lee, Self-Stabilization, ICLR 2023",
)


APPROXIMATIONS: dict[str, Approximation] = {
    a.name: a
    for a in (
        CONTINUOUS_TIME_1,
        NO_OSCILLATION,
        CONTINUOUS_TIME_2,
        CONTINUOUS_TIME_3,
        NO_THIRD_DERIVATIVES,
        REAL_PART,
        UNRESOLVED_GRADIENT_FLOW,
        QUASI_STATIC_OSCILLATION,
        CRITICAL_SUBSPACE,
        SECOND_ORDER_OSCILLATION,
        SINGLE_CRITICAL,
        LINEAR_FLOQUET_GROWTH,
        TRACKED_SUBSPACE,
        ADIABATIC_EIGENVECTORS,
        CONTINUOUS_TIME_OFF_TRACKED,
        MODIFIED_OFF_TRACKED,
        CONTINUOUS_TIME_COUPLING,
        ISOTROPIC_INJECTION,
        EFFECTIVE_STEP_SIZE,
        NO_OSCILLATION_CRITICAL,
        SLAVED_TOP_DIRECTION,
    )
}
"""Every approximation above by its slug (``Approximation.name``)."""
