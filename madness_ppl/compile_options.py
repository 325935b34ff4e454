"""XLA options for the programs a fit runs only a few times: compile them fast.

On a CPU the first field of a source-count bucket spends most of its time compiling (7-16 s on
2-core VMs for a 6-source field against ~1-2 s warm; ``benchmarks/compile_time.py``), and most
of that is LLVM optimising machine code. A program that runs once per field (the L-BFGS start,
the curvature probe of the preconditioner, the encoder's decoded residual passes, the curvature
check of a converged fit, the refinement's trial losses) gains nothing from that optimisation
that is worth its compile time, so those programs are compiled with :data:`ONCE`: backend
optimisation level 0 and LLVM's expensive passes off (their XLA time fell by about a third on a
2-core AMD EPYC). The programs that run hundreds of times (the L-BFGS step) or carry most of a
dense field's time (the refinement's Jacobians) keep XLA's defaults, and so does the fit's final
program: at level 0 the loss it reports for a field fitted in a batch differed from the same
field fitted alone by 1.4e-5 of its value, where the defaults agree to float32 rounding. Options
are part of a program's key in the persistent cache (:mod:`madness_ppl.cache`), so cached
programs stay consistent.

Use as ``jax.jit(fn, compiler_options=ONCE)`` on a function that is only called at top level:
JAX refuses compiler options on a jit nested in another program (call the plain function
there).
"""

from __future__ import annotations

__all__ = ["ONCE"]

#: XLA compiler options of the programs run once per field (module docstring).
ONCE: dict[str, int | bool] = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
