"""The command line's tables: each option's help sentence (:data:`HELP`), the keywords it carries another way
(:data:`ROUTED`) or leaves to Python (:data:`API_ONLY`), and the choices of an option that has a fixed set
(:data:`CHOICES`); :mod:`neuralflow.options` builds the options from the functions' signatures and these."""

from __future__ import annotations

#: Help sentences, by ``function.keyword`` or, for a keyword that means the same everywhere, by ``keyword``.
HELP: dict[str, str] = {
    # run_gd
    "run_gd.lr": "GD step size (learning rate); the edge of stability is at sharpness 2/lr.",
    "run_gd.steps": "Number of GD steps.",
    "run_gd.eig_every": "Measure the sharpness every this many steps (0: never).",
    "run_gd.n_eigs": "How many top Hessian eigenvalues to track.",
    "run_gd.store_every": "Keep every this many iterates (the scalar series are kept at every step).",
    "run_gd.eig_tol": "Relative residual to which LOBPCG solves for the sharpness.",
    "run_gd.eig_retries": "Cold restarts of an eigen-solve that missed eig_tol before its step is recorded as NaN.",
    "run_gd.checkpoint_every": "With --resume: write the run's state there every this many steps (0: only on Ctrl-C).",
    "run_gd.resume": "The run's checkpoint file: continue from it if it exists (bit for bit); written as the run goes.",
    # (planned in the design: the Gaussian noise nu added to each coordinate after every step)
    "run_gd.noise": "Standard deviation of the Gaussian noise added to each coordinate after every step (0: exact GD).",
    "run_gd.noise_seed": "Seed of the noise added after every step.",
    # problem builders
    "n": "Number of training examples.",
    "widths": "Hidden-layer widths of the MLP.",
    "activation": "Activation function (tanh, gelu, softplus, sigmoid, relu; relu rules out third derivatives).",
    "depth": "Number of scalar factors.",
    "theta0": "Initial point, one number per parameter.",
    "channels": "Channels of the two convolutional layers.",
    "length": "Length of each generated sequence.",
    "hidden": "Hidden size (of the LSTM; of a gate's net in a term library).",
    "batch_size": "Split the data into parts of at most this many examples (memory; the loss is unchanged).",
    "loss": "Loss of a module problem: mse (0.5 ||f(x) - y||^2) or ce (cross-entropy).",
    # compare
    "compare.steps": "Compare up to this step (default: the whole run).",
    "compare.half_width": "GD's loss is averaged over +-this many steps to compare with a predicted time-average.",
    "compare.n_probe": "Number of evenly spaced stored steps at which sharpness is compared.",
    "compare.solver": "torchdiffeq method for every flow (default: each flow's own; the central flow's is euler).",
    "compare.step_size": "Fixed-grid solver step, in steps (default: the flow's own).",
    "compare.rtol": "Adaptive solver relative tolerance (default: 1e-7).",
    "compare.atol": "Adaptive solver absolute tolerance (default: 1e-9).",
    # fit
    "fit.window": "Steps integrated from each window start.",
    "fit.target": "Fit GD's iterates or their midpoint process (smoothed).",
    "fit.method": "adjoint or direct ODE fits, or the derivative regression (no ODE solve in the loop).",
    "fit.optimizer": "Optimiser of the ODE fit (auto: Gauss-Newton for at most 64 parameters, else LBFGS).",
    "fit.min_norm": "Windows whose displacement is below this fraction of the mean are left out.",
    "fit.max_iters": "Optimiser iterations (default: per optimiser; 200 for a gated regression).",
    "fit.val_fraction": "Fraction of the windows held out for validation and early stopping.",
    "fit.stride": "Steps between window starts (default: the window, disjoint windows).",
    "fit.patience": "Stop after this many iterations without a better validation error.",
    "fit.tol": "Stop when the training loss improves by less than this (relative).",
    "fit.init": "Start a term library from the regression (regression), the model as built (current) or auto.",
    "fit.learning_rate": "Adam's learning rate.",
    "fit.seed": "Seed of the validation split and of the gates' first layers.",
    "fit.solver": "torchdiffeq method for the window solves (rk4, euler, dopri5, ...); default: the flow's, else rk4.",
    "fit.step_size": "Fixed-grid substep in steps; default: the flow's own, else set by the measured sharpness.",
    "fit.rtol": "Adaptive solver relative tolerance.",
    "fit.atol": "Adaptive solver absolute tolerance.",
    "fit.balance": "Regression: weight points by the inverse local mean of their squared residual.",
    "fit.exclude": "Step ranges START:STOP (an empty end is open) whose windows are left out, comma-separated.",
    "fit.resume": "Gauss-Newton state file: continue the fit from it if it exists, update it every iteration.",
    "fit.extra_start": "For a flow with extra state: start each window's extra state from the trajectory's "
    "measurement ('measured') or fit it per window ('fitted', needs --val-fraction 0).",
    "fit.variance_weight": "Weight w of the measured oscillation variance in the loss, w * mean (log s_model - "
    "log s_measured)^2 (flows that predict it; 0 leaves it out).",
    # TermLibrary
    "TermLibrary.terms": "Correction terms, comma-separated (see corrections.TERMS).",
    "TermLibrary.gated": "Terms whose coefficient is gated by state features, comma-separated.",
    "TermLibrary.features": "State features the gates see, comma-separated (see corrections.FEATURES).",
    "TermLibrary.max_critical": "At most this many critical eigenvalues for gradScrit.",
    "TermLibrary.eig_tol": "LOBPCG relative residual of the terms' eigen-solves.",
    "TermLibrary.amplitude": "Features that scale a gated coefficient's amplitude, comma-separated.",
    "TermLibrary.baseline": "Gated terms that keep a constant coefficient below the edge of stability (their gate "
    "is then the change at lr S = 2).",
    # build_report
    "build_report.distill_terms": "Terms a neural correction is distilled onto, comma-separated.",
    "build_report.max_states": "At most this many target states at which the correction is evaluated.",
    "build_report.max_windows": "At most this many windows in the report's figures.",
    "build_report.sharpness": "Measure sharpness for the figures (auto: when the trajectory recorded it).",
    "build_report.n_folds": "Folds of the blocked cross-validation of the sparse formulas.",
    "build_report.batch": "States per batch when evaluating the correction.",
    "build_report.negligible": "A share below this is reported as negligible.",
    "build_report.outside": "Above this unexplained fraction the report says the physics is outside the library.",
    "build_report.min_share": "A term below this share is not suggested.",
    "build_report.hidden_state": "Run the hidden-state diagnostic on a state-only correction (windows from nearly the "
    "same state that need opposite corrections).",
    # flows (in a spec: central:above_edge=hold)
    "critical": "Eigenvalues >= critical / lr are critical.",
    "relaxation": "Time constant, in steps, that draws a critical eigenvalue below 2/lr to it.",
    "max_critical": "At most this many critical eigenvalues.",
    "eig_tol": "LOBPCG relative residual.",
    "sdcp_tol": "Tolerance of the complementarity problem's solver.",
    "gram_every": "Recompute the Gram matrix every this many evaluations.",
    "above_edge": "error: refuse a start above 2/lr; hold: hold those eigenvalues where they are.",
    "order": "Order of the modified equation (the oscillation flow: 1 adds -(lr^2/2) P H g off the tracked "
    "directions, 0 is continuous time).",
    "k": "Number of eigen-directions (default: all).",
    "q": "Oscillation flow: variance injected per step along each direction (default: the float round-off floor).",
    "n_track": "Oscillation flow: number of top eigenvectors whose oscillation covariance is carried.",
    "stiffness": "Oscillation flow: factor on the Floquet rate (1 is GD; large values approach the central flow).",
    "max_decay": "Oscillation flow: clamp on the decay rate -log|1 - lr lambda| near lr lambda = 1.",
    "lag": "Oscillation flow: steps by which both couplings run late, to first order (GD's map: 1/2; Euler in half "
    "steps carries 1/4 of it).",
    # demo
    "run_demo.out": "Folder for the demo's files (created if needed).",
    "run_demo.fast": "A shrunken run (seconds, for tests): fewer steps, one fit step.",
    # common
    "seed": "Random seed (the problem's initialisation in run-gd, the fit's split and gates in fit).",
    "dtype": "Floating dtype (float64, float32); analysis commands default to the trajectory's.",
    "device": "Torch device (cpu, cuda, cuda:1); analysis commands default to cpu.",
}

#: Keywords the command line carries by another option: ``function.keyword -> how``.
ROUTED: dict[str, str] = {
    "run_gd.problem": "--problem and the problem's own options",
    "run_gd.progress": "--quiet",
    "compare.trajectory": "the TRAJECTORY argument",
    "compare.flows": "--flows (each flow's options in its spec)",
    "compare.problem": "rebuilt from the trajectory's description (--device, --dtype)",
    "compare.progress": "--quiet",
    "fit.model": "--physics (each flow's options in its spec) and the term library's options",
    "fit.trajectory": "the TRAJECTORY argument",
    "fit.progress": "--quiet",
    "TermLibrary.problem": "rebuilt from the trajectory's description",
    "TermLibrary.lr": "the trajectory's lr",
    "build_report.result": "the fit that fit has just made, or the one report reads from its file argument",
    "from_file.path": "--problem module:PATH:FUNCTION",
    "from_file.function": "--problem module:PATH:FUNCTION",
    "flow.problem": "rebuilt from the trajectory's description",
    "flow.lr": "the trajectory's lr",
    "run_demo.progress": "--quiet",
    "run_demo.quiet": "--quiet",
}

#: Keywords deliberately left to Python, with the reason.
API_ONLY: dict[str, str] = {
    "run_gd.theta0": "a tensor; --theta0 of zhu-quartic and scalar-factorization sets the start from the command "
    "line, any other start needs Python",
    "quadratic.A": "a matrix; build quadratic(A) in Python",
    "quadratic.theta0": "belongs to quadratic, which is Python-only",
    "compare.window": "the old name of half_width (deprecated; a fit's window is its shooting window)",
    "compare.method": "the old name of solver (deprecated; a fit's method is its gradient method)",
    "run_demo.settings": "a DemoSettings dataclass of the whole demo; the command line runs the built-in default "
    "(--fast shrinks it), other settings need Python",
}

#: Choices of string keywords (checked before any computation).
CHOICES: dict[str, tuple[str, ...]] = {
    "fit.target": ("iterates", "smoothed"),
    "fit.method": ("adjoint", "direct", "regression"),
    "fit.optimizer": ("auto", "gauss-newton", "lbfgs", "adam"),
    "fit.init": ("auto", "regression", "current"),
    "fit.extra_start": ("measured", "fitted"),
    "activation": ("tanh", "gelu", "softplus", "sigmoid", "relu"),
    "loss": ("mse", "ce"),
    "above_edge": ("error", "hold"),
}
