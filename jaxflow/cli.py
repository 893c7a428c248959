"""What every script shares: absl flag errors reported as one line on stderr with exit code 2, a
persistent XLA compilation cache (on by default), so a second run of a script skips most compilation,
cheap compilation for small models (where compiling costs far more than running), and the scale-out
flags (--mesh, --sharding, --distributed)."""
from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_bool("compile_cache", True, "keep compiled programs in a persistent cache (JAXFLOW_CACHE_DIR, "
                  "default ~/.cache/jaxflow/xla) so later runs start in seconds; --nocompile_cache turns it off")

flags.DEFINE_enum("fast_compile", "auto", ["auto", "on", "off"],
                  "compile with XLA's backend optimisation level 0 (programs compile about 3x faster and run "
                  "slower); auto: on for small models (the embedded toy, checkpoints under 64 MB of weights), "
                  "where compiling dominates")

flags.DEFINE_string("mesh", None, "shard the model over this process's devices: data:N,model:M (N x M = the local "
                    "device count; batch rows and variants on data, heads/MLP/vocabulary on model); default: one device")
flags.DEFINE_enum("sharding", "tp", ["tp", "fsdp"], "with --mesh: tp shards heads, MLP width and vocabulary on the "
                  "model axis; fsdp also spreads the embedding width over the data axis")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() first (multi-host runs; the cluster's "
                  "environment names the coordinator, or give --coordinator, --num_processes and --process_id)")
flags.DEFINE_string("coordinator", None, "with --distributed: the coordinator's host:port (process 0's)")
flags.DEFINE_integer("num_processes", None, "with --distributed: how many processes take part")
flags.DEFINE_integer("process_id", None, "with --distributed: this process's index, 0..num_processes-1")

SMALL_MODEL_BYTES = 64 << 20
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def weights_bytes(checkpoint: str | None) -> int | None:
    """Bytes of a jaxflow checkpoint's stored weights (its params folder), 0 for the embedded toy
    model (checkpoint None), None when there is no such folder."""
    if checkpoint is None:
        return 0
    root = os.path.join(checkpoint, "params")
    if not os.path.isdir(root):
        return None
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


def use_fast_compile(setting: str, checkpoint: str | None) -> bool:
    """Whether a run compiles at optimisation level 0: "on"/"off" as given; "auto" for a model whose
    weights are under SMALL_MODEL_BYTES."""
    if setting != "auto":
        return setting == "on"
    size = weights_bytes(checkpoint)
    return size is not None and size < SMALL_MODEL_BYTES


def enable_fast_compile() -> bool:
    """Adds XLA's backend optimisation level 0 to XLA_FLAGS (read when jax first creates its backend,
    so call it before any computation); a level the user set in XLA_FLAGS wins. Returns whether set."""
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in current:
        return False
    os.environ["XLA_FLAGS"] = (current + " " + FAST_COMPILE_FLAG).strip()
    return True


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


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> tuple[int, int]:
    """jax.distributed.initialize (arguments None: detected from the cluster's environment). On CPU the
    processes exchange nothing but the coordinator's barriers. Returns (process_index, process_count)."""
    import jax

    kw = {k: v for k, v in (("coordinator_address", coordinator), ("num_processes", num_processes),
                            ("process_id", process_id)) if v is not None}
    jax.distributed.initialize(**kw)
    return jax.process_index(), jax.process_count()


def mesh_from_flags():
    """The mesh --mesh asks for (over this process's devices), or None; a bad request exits 2 with one line."""
    if flags.FLAGS.mesh is None:
        return None
    from jaxflow.sharding import MeshError, make_mesh

    try:
        return make_mesh(flags.FLAGS.mesh)
    except MeshError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


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
    cache is turned on unless --nocompile_cache; small models compile at optimisation level 0
    (--fast_compile)."""
    def checked(argv):
        if len(argv) > 1:
            print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are written --name=value)",
                  file=sys.stderr)
            sys.exit(2)
        # auto: only scripts that run a checkpoint (training, conversion and figures keep the default)
        has_model = "checkpoint" in flags.FLAGS
        setting = flags.FLAGS.fast_compile
        if setting == "on" or (setting == "auto" and has_model and
                               use_fast_compile("auto", flags.FLAGS["checkpoint"].value)):
            enable_fast_compile()
        if flags.FLAGS.compile_cache:
            enable_compile_cache()
        if flags.FLAGS.distributed:
            initialize_distributed(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
        elif any(flags.FLAGS[f].present for f in ("coordinator", "num_processes", "process_id")):
            print("error: --coordinator, --num_processes and --process_id need --distributed", file=sys.stderr)
            sys.exit(2)
        return main(argv)

    app.run(checked, flags_parser=parse_flags)
