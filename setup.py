"""Build the optional compiled kernels: every ``rlhf_ref/_core/*.pyx`` becomes an extension.

Everything else (metadata, dependencies, package data) is in pyproject.toml.

The kernels are OPTIONAL by default: without Cython, without a C compiler, or when one of them
fails to compile, ``pip install .`` still succeeds, prints a banner
"compiled kernels not built: <reason>" (pip shows build output with ``-v``), and the package
runs on its NumPy reference; ``rlhf-ref info`` then says the ``cython`` backend is unavailable
and why.

Environment switches (a value of 1/true/yes/on turns one on):

    RLHF_REF_REQUIRE_EXT=1     strict: any failure (no Cython, no compiler, a compile error) fails
                               the build. CI sets it (scripts/test.sh), so a silent fallback to
                               NumPy cannot pass CI.
    RLHF_REF_PUREPYTHON=1      build no extension at all (a pure py3-none-any wheel).
    RLHF_REF_CYTHON_DEBUG=1    boundscheck, wraparound and initializedcheck ON (for debugging a
                               kernel that reads out of bounds); cdivision stays on so that the
                               arithmetic is the same as in the release build.
    RLHF_REF_ASAN=1            compile and link with AddressSanitizer (gcc/clang: -fsanitize=address);
                               Python is not built with it, so run with LD_PRELOAD of libasan
                               (`gcc -print-file-name=libasan.so`) and ASAN_OPTIONS=detect_leaks=0.
                               scripts/test.sh builds RLHF_REF_CYTHON_DEBUG=1 RLHF_REF_ASAN=1 into a
                               temporary copy of the tree and runs the equivalence and hostile suites
                               on it (issue 10).
    RLHF_REF_CYTHON_ANNOTATE=1 also write Cython's annotated .html next to the generated .c.
    RLHF_REF_NATIVE=1          add -march=native (never the default: such a binary can die with
                               SIGILL on another CPU).
    RLHF_REF_OPENMP=0          do not use OpenMP even if the compiler supports it (prange then
                               runs serially).

Compiler flags: -O3 -ffp-contract=off (gcc/clang), -fopenmp when a tiny compile-and-link probe succeeds. NEVER
-ffast-math (nor -Ofast / -funsafe-math-optimizations): a shared library built with it flips
FTZ/DAZ for the whole process when loaded and breaks the ±inf handling that masking and
log-softmax rely on; such flags are removed from the compiler command if CFLAGS carries them
(tests/conftest.py fails any test after which the FPU mode changed).

Notes from building this on Python 3.11 / gcc 12 / Cython 3.3.1 / SciPy 1.17.1:

* ``cythonize()`` returns NEW Extension objects rebuilt from a fixed list of distutils fields, so
  ``optional=True`` passed to Extension() is lost; it is set on the returned objects instead.
* A .pyx that does ``from scipy.linalg.cython_blas cimport sgemm, dgemm`` and passes
  ``&a[0, 0]`` of typed memoryviews (``float[:, ::1]`` / ``double[:, ::1]``, a fused type)
  cythonizes and compiles with NO include_dirs and no link flags: SciPy ships the .pxd, and the
  BLAS function pointers are fetched at import time from ``scipy.linalg.cython_blas``'s
  ``__pyx_capi__`` (the .so links nothing but libc). Consequence: importing such an extension
  imports SciPy, and raises ModuleNotFoundError("No module named 'scipy...'") without it; the
  backend registry turns that into "scipy not installed". Row-major C = A @ B is the
  column-major call ``gemm('N', 'N', n, m, k, 1, B, n, A, k, 0, C, n)``.
  tests/test_packaging.py builds such a probe .pyx to keep this true.
* Modules with only typed memoryviews include no NumPy header: no NumPy at build time.
* The generated C goes to build/cython (``build_dir``): never next to the .pyx, where a stale
  copy could be packed into a wheel.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import textwrap

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CORE_GLOB = "rlhf_ref/_core/*.pyx"
CYTHON_BUILD_DIR = os.path.join("build", "cython")
FAST_MATH_FLAGS = ("-ffast-math", "-Ofast", "-funsafe-math-optimizations", "/fp:fast")


def env_flag(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    return v.strip().lower() in ("1", "true", "yes", "on")


REQUIRE = env_flag("RLHF_REF_REQUIRE_EXT")
PURE = env_flag("RLHF_REF_PUREPYTHON")
DEBUG = env_flag("RLHF_REF_CYTHON_DEBUG")
ASAN = env_flag("RLHF_REF_ASAN")
ANNOTATE = env_flag("RLHF_REF_CYTHON_ANNOTATE")
NATIVE = env_flag("RLHF_REF_NATIVE")
OPENMP = env_flag("RLHF_REF_OPENMP", default=True)

# Compiler directives, set once here for every kernel (STYLE.md). The debug switch turns the
# checks on; cdivision stays True in both builds (C semantics for / and %, no zero check), so a
# debug build computes exactly what the release build computes.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}


def log(msg: str) -> None:
    print(f"rlhf_ref setup: {msg}", file=sys.stderr, flush=True)


def banner(reason: str) -> None:
    line = "!" * 78
    print(f"\n{line}\n!! compiled kernels not built: {reason}\n"
          f"!! rlhf_ref installs anyway and runs on its NumPy reference ('rlhf-ref info' lists the backends).\n"
          f"!! Set RLHF_REF_REQUIRE_EXT=1 to make this an error.\n{line}\n", file=sys.stderr, flush=True)


def fail(reason: str):
    raise SystemExit(f"rlhf_ref setup: compiled kernels not built and RLHF_REF_REQUIRE_EXT=1: {reason}")


def not_built(reason: str) -> None:
    if REQUIRE:
        fail(reason)
    banner(reason)


def module_name(path: str) -> str:
    return os.path.splitext(path)[0].replace("/", ".").replace(os.sep, ".")


def cython_extensions():
    """The cythonized extensions (a list, maybe empty); never raises unless REQUIRE."""
    if PURE:
        if REQUIRE:
            fail("RLHF_REF_PUREPYTHON=1 and RLHF_REF_REQUIRE_EXT=1 contradict each other")
        log("RLHF_REF_PUREPYTHON=1: building no extension")
        return []
    pyx = sorted(glob.glob(CORE_GLOB, root_dir=HERE))
    if not pyx:
        log(f"no {CORE_GLOB}: nothing to compile")
        return []
    try:
        from Cython.Build import cythonize
        from setuptools import Extension
    except Exception as e:          # not installed (--no-build-isolation without Cython), or broken
        not_built(f"Cython is not importable ({type(e).__name__}: {e}); pip install 'Cython>=3.0,<4'")
        return []
    # Changing the directives does not touch the .pyx, so cythonize's timestamp check would keep
    # the old .c: remember what the .c files were generated with and force a rebuild on change.
    stamp = os.path.join(HERE, CYTHON_BUILD_DIR, "directives.json")
    want = json.dumps({"directives": DIRECTIVES, "annotate": ANNOTATE}, sort_keys=True)
    try:
        with open(stamp) as f:
            force = f.read() != want
    except OSError:
        force = True
    exts = [Extension(module_name(p), [p]) for p in pyx]
    try:
        exts = cythonize(exts, build_dir=CYTHON_BUILD_DIR, compiler_directives=DIRECTIVES,
                         annotate=ANNOTATE, force=force, quiet=True)
    except Exception as e:          # Cython.Compiler.Errors.CompileError: a .pyx does not compile
        not_built(f"cythonize failed ({type(e).__name__}: {e}); rerun with -v to see Cython's error")
        return []
    os.makedirs(os.path.dirname(stamp), exist_ok=True)
    with open(stamp, "w") as f:
        f.write(want)
    for ext in exts:                # cythonize() drops optional=True: set it on what it returned
        ext.optional = not REQUIRE
        if DEBUG:                   # _lstm_cy.DEBUG_BUILD says which build was imported (scripts/test.sh)
            ext.define_macros = list(ext.define_macros or []) + [("RLHF_REF_CYTHON_DEBUG", "1")]
    return exts


def _compile_and_link(compiler, source: str, flags) -> bool:
    """True when ``source`` compiles and links into an executable with ``flags``."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        try:
            objs = compiler.compile([src], output_dir=d, extra_postargs=list(flags))
            compiler.link_executable(objs, os.path.join(d, "probe"), extra_postargs=list(flags))
        except Exception:
            return False
    return True


OPENMP_PROBE = textwrap.dedent("""\
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return (n >= 1 && omp_get_max_threads() >= 1) ? 0 : 1;
    }
    """)


class BuildExt(build_ext):
    """build_ext that never fails unless strict, and sets the flags once per compiler."""

    def initialize_options(self):
        super().initialize_options()
        self._failed = []           # (extension name, reason) of the optional ones that failed

    def run(self):
        try:
            super().run()           # creates the compiler: DistutilsPlatformError when there is none
        except Exception as e:
            if REQUIRE:
                raise
            self.extensions = []    # none of them is there to copy or list as an output
            banner(f"the build step failed: {type(e).__name__}: {e}")
            return
        if self._failed:
            banner("; ".join(f"{name}: {why}" for name, why in self._failed))
        elif self.extensions:
            log("compiled kernels built: " + ", ".join(e.name for e in self.extensions))

    def build_extensions(self):
        compile_args, link_args = self._flags()
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_args
            ext.extra_link_args = list(ext.extra_link_args or []) + link_args
        super().build_extensions()
        self._drop_failed()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:      # CompileError, LinkError, a missing compiler executable, ...
            if REQUIRE or not getattr(ext, "optional", False):
                raise
            self._failed.append((ext.name, f"{type(e).__name__}: {e}"))

    def _drop_failed(self):
        # An extension that did not build must not be copied in place (editable installs) or
        # listed as an output; keep only the ones that exist.
        failed = {name for name, _ in self._failed}
        self.extensions = [e for e in self.extensions if e.name not in failed]

    def _flags(self):
        cc = self.compiler
        self._strip_fast_math(cc)
        if cc.compiler_type == "msvc":
            opt, omp, native = ["/O2"], ["/openmp"], []
            omp_link = []
        else:
            # -ffp-contract=off: GCC contracts a*b + c into an FMA by default wherever the target has
            # one (aarch64 always, x86-64 with -march=native); α·z − m must round α·z first (issue
            # 10: the same hazard as Numba's {"contract"} in the softmax)
            opt, omp, native = ["-O3", "-ffp-contract=off"], ["-fopenmp"], ["-march=native"]
            omp_link = ["-fopenmp"]
        compile_args, link_args = list(opt), []
        if NATIVE:
            compile_args += native
        san = ["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN and cc.compiler_type != "msvc" else []
        compile_args += san
        link_args += san
        if not OPENMP:
            log("OpenMP off (RLHF_REF_OPENMP=0): prange runs serially")
        elif _compile_and_link(cc, OPENMP_PROBE, omp + san):
            log(f"OpenMP: yes ({' '.join(omp)})")
            compile_args += omp
            link_args += omp_link
        else:
            log("OpenMP: no (the probe did not compile and link); prange runs serially")
        log(f"compiler flags: {' '.join(compile_args)}; link flags: {' '.join(link_args) or '-'}; "
            f"directives: {DIRECTIVES}")
        return compile_args, link_args

    @staticmethod
    def _strip_fast_math(cc):
        for attr in ("compiler", "compiler_so", "compiler_cxx", "linker_so", "compile_options"):
            cmd = getattr(cc, attr, None)
            if isinstance(cmd, list) and any(f in cmd for f in FAST_MATH_FLAGS):
                log(f"removing {[f for f in cmd if f in FAST_MATH_FLAGS]} from the compiler's {attr}: "
                    f"fast math changes the FPU mode of the whole process and breaks ±inf handling")
                setattr(cc, attr, [f for f in cmd if f not in FAST_MATH_FLAGS])


setup(ext_modules=cython_extensions(), cmdclass={"build_ext": BuildExt})
