"""What every script shares: absl flag errors reported as one line on stderr with exit code 2, and a
persistent XLA compilation cache (on by default), so a second run of a script skips most compilation."""
from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_bool("compile_cache", True, "keep compiled programs in a persistent cache (JAXFLOW_CACHE_DIR, "
                  "default ~/.cache/jaxflow/xla) so later runs start in seconds; --nocompile_cache turns it off")


def cache_dir() -> str:
    """The persistent compilation cache folder: $JAXFLOW_CACHE_DIR, else $XDG_CACHE_HOME/jaxflow/xla,
    else ~/.cache/jaxflow/xla."""
    if os.environ.get("JAXFLOW_CACHE_DIR"):
        return os.environ["JAXFLOW_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxflow", "xla")


def enable_compile_cache(path: str | None = None) -> str | None:
    """Turns on jax's persistent compilation cache in `path` (default `cache_dir()`), caching every
    program however fast it compiled; returns the folder, or None when it cannot be created (the run
    then simply compiles, as without a cache)."""
    import jax

    path = path or cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv):
    """absl's parser, with a flag error reported like every other error: one line, exit code 2, and
    --help (-h, --helpshort, --helpfull) printing the usage to stdout with exit code 0 (absl exits 1)."""
    asked = [a for a in argv[1:] if a.split("=")[0] in HELP_FLAGS]
    if asked:
        app.usage(shorthelp=asked[0].split("=")[0] != "--helpfull", writeto_stdout=True)
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """app.run(main) with `parse_flags`; stray positional arguments are an error too; the compilation
    cache is turned on unless --nocompile_cache."""
    def checked(argv):
        if len(argv) > 1:
            print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)",
                  file=sys.stderr)
            sys.exit(2)
        if flags.FLAGS.compile_cache:
            enable_compile_cache()
        return main(argv)

    app.run(checked, flags_parser=parse_flags)
