"""Builds the optional native parts (src/socket_echo/{tcp,udp,tools}/_native.c); pyproject.toml holds
everything else. Where it cannot be built (no compiler, not Linux) the install still succeeds
and says, in one line, that the pure-Python paths will run. ``SOCKET_ECHO_NO_EXTENSIONS=1``
skips it; ``SOCKET_ECHO_SANITIZE=1`` builds it with AddressSanitizer and UBSan (make
sanitize)."""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FALLBACK = "socket-echo: native extensions not built ({}); the pure-Python data paths will run"


class OptionalBuildExt(build_ext):
    """Builds what it can; says once, in one line, if anything could not be built."""

    failed = None

    def run(self):
        self.failed = []
        try:
            super().run()
        except Exception as exc:  # no compiler at all, or nothing to copy
            self.failed.append(str(exc).splitlines()[0][:120])
        if self.failed:
            print(FALLBACK.format(self.failed[0]), file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # a compiler error: leave this one out
            self.failed.append(f"{ext.name}: {type(exc).__name__}")

    def copy_extensions_to_source(self):
        """Editable installs copy what was built into src/: not what failed."""
        names = {f.split(":")[0] for f in self.failed or []}
        self.extensions, every = [e for e in self.extensions if e.name not in names], self.extensions
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = every


# tcp/: the engine (pure C, no Python.h: no Python call can happen in its thread) and its
# CPython binding.
SOURCES = {"tcp": ("_native.c", "engine.c")}
HEADERS = {"tcp": ("engine.h",)}


def extensions():
    if os.environ.get("SOCKET_ECHO_NO_EXTENSIONS") or not sys.platform.startswith("linux"):
        return []
    flags = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
    link = []
    sanitize = os.environ.get("SOCKET_ECHO_SANITIZE")  # make sanitize, make sanitize-thread
    if sanitize:
        checks = "thread" if sanitize == "thread" else "address,undefined"
        flags += ["-O1", "-g", f"-fsanitize={checks}", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={checks}"]
    tls = openssl_found()
    return [
        Extension(
            f"socket_echo.{part.replace('/', '.')}._native",
            [f"src/socket_echo/{part}/{name}" for name in SOURCES.get(part, ("_native.c",))],
            depends=[f"src/socket_echo/{part}/{name}" for name in HEADERS.get(part, ())],
            extra_compile_args=flags,
            extra_link_args=link,
            # bench's C loop speaks TLS where OpenSSL's headers are (libssl-dev); without them
            # it is built without, and bench over tls:// runs in the Python loop (and says so)
            define_macros=[("SE_TLS", "1")] if part == "tools/bench" and tls else [],
            libraries=["ssl", "crypto"] if part == "tools/bench" and tls else [],
        )
        for part in ("tcp", "udp", "tools/bench")
    ]


def openssl_found():
    """OpenSSL's headers and its link library where the compiler looks (Debian's
    libssl-dev puts them in /usr/include and /usr/lib/<multiarch>)."""
    import sysconfig

    includes = ["/usr/include", "/usr/local/include"]
    if not any(os.path.exists(os.path.join(d, "openssl", "ssl.h")) for d in includes):
        return False
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    libs = ["/usr/lib", "/usr/lib64", "/usr/local/lib", os.path.join("/usr/lib", arch)]
    return any(os.path.exists(os.path.join(d, "libssl.so")) for d in libs)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
