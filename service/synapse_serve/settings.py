"""Settings from the environment, prefix ``SYNAPSE_`` (e.g. ``SYNAPSE_PORT=9000``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the server can be told; built inside ``create_app`` / the CLI, never at import."""

    model_config = SettingsConfigDict(env_prefix="SYNAPSE_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    state_dir: Path = Field(Path("state"), description="local directory for the server's state")
    log_level: str = Field("info", description="uvicorn/python log level")
    max_body_bytes: int = Field(256 << 20, ge=1024, description="largest request body; larger is a 413")
    max_tensor_elements: int = Field(1 << 28, ge=1, description="largest tensor a body may declare")
    max_json_body_bytes: int = Field(
        16 << 20, ge=1024, description="largest JSON request body (msgpack ones: max_body_bytes); larger is a 413. "
                                       "Reading JSON holds the interpreter: ~0.1 s a megabyte that no other request "
                                       "runs in")
    max_body_values: int = Field(
        1 << 16, ge=1024, description="most values a msgpack body or session frame may hold (maps, arrays, keys, "
                                      "scalars; a tensor's data is one), and most arrays and objects a JSON body may: "
                                      "each becomes a Python object of 30-70 bytes from as little as one byte sent; "
                                      "more is a 413")
    max_instances: int = Field(10_000, ge=1, description="most instances the server holds")
    warmup: bool = Field(True, description="compile a small synapse at start-up before /readyz says ready")
    max_compiled_programs: int = Field(
        2048, ge=1, description="programs compiled (or loaded from the compilation cache) since the last release "
                                "beyond which the process releases every compiled program; the ones in use "
                                "compile again on their next call. Bounds the memory and memory maps compiled "
                                "programs hold: a client sending a new batch size each call compiles each time")
    max_memory_maps: int = Field(
        0, ge=0, description="memory maps the process may hold before it releases every compiled program (counted "
                             "after a compile, at most once a second; Linux); 0: half the kernel's vm.max_map_count, "
                             "past which the next compile would crash the process")
    compilation_cache: bool = Field(
        True, description="keep compiled programs in <state_dir>/jax-cache: a restart does not compile again")
    compilation_cache_max_bytes: int = Field(
        1 << 30, ge=1 << 16, description="most bytes the compiled programs in <state_dir>/jax-cache may take; past "
                                         "it, the oldest written go (looked at every compilation_cache_prune_s)")
    compilation_cache_prune_s: float = Field(
        60.0, gt=0, le=3600, description="seconds between looks at the compilation cache's size")
    durability: Literal["sync", "interval", "off"] = Field(
        "interval", description="sync: stored before acknowledged; interval: written every flush_interval_s "
                                "and at shutdown; off: memory only")
    flush_interval_s: float = Field(2.0, gt=0, le=3600, description="interval mode: seconds between writes")
    auth: Literal["auto", "on", "off"] = Field(
        "auto", description="bearer tokens: auto = on when tokens are configured or the address is not loopback")
    tokens: str = Field("", repr=False, description="owner:token or owner:sha256=<hex>, comma-separated; "
                                                    "append :admin for an admin")
    tokens_file: Path | None = Field(None, description="a file of token specs, one per line")
    allow_public_without_auth: bool = Field(
        False, description="serve a non-loopback address with auth off (only behind a trusted proxy)")
    metrics_open: bool = Field(False, description="serve /metrics without a token even when auth is on")
    max_instances_per_owner: int = Field(1000, ge=1, description="quota: instances per owner")
    max_state_bytes_per_owner: int = Field(16 << 30, ge=1, description="quota: state bytes per owner")
    max_snapshot_bytes_per_owner: int = Field(16 << 30, ge=1, description="quota: bytes of snapshot files per owner")
    max_batch: int = Field(65536, ge=1, description="largest batch a call may send or a signal compartment may hold")
    max_answer_bytes: int = Field(
        256 << 20, ge=1024, description="largest answer a sequence call may keep (its returned compartments, once "
                                        "per kept step); a larger one is refused (422) before it runs")
    idempotency_answer_bytes: int = Field(
        256 << 20, ge=0, description="bytes of stored answers to Idempotency-Key calls, server-wide; beyond it the "
                                     "oldest answers' tensors are dropped (their calls still never run twice)")
    head_timeout_s: float = Field(10.0, gt=0, description="a request's line and headers must arrive within this many "
                                                          "seconds (408; also a connection that sends nothing)")
    max_connections: int = Field(
        0, ge=0, description="open connections at most (HTTP and session streams); one more is answered 503 and "
                             "closed at once. 0: the process's descriptor limit less a reserve for the state "
                             "directory, logs and JAX (a quarter of it, at least 128)")
    body_timeout_s: float = Field(300.0, gt=0, description="a request body must arrive within this many seconds")
    body_idle_timeout_s: float = Field(30.0, gt=0, description="a request body may pause this long between chunks")
    access_log: bool = Field(True, description="one JSON line per request on the synapse_serve.access logger")
    session_idle_s: float = Field(300.0, gt=0, description="a session stream idle this long is closed")
    operation_route: bool = Field(
        True, description="serve operations and packed calls through lean routes at the head of the router (the "
                          "same handlers and checks as the documented FastAPI routes, without their dependency "
                          "solving); off: FastAPI's routes alone (for comparisons)")
    busy_poll_us: float = Field(
        250.0, ge=0, le=100_000, description="after each answer to a session frame or an operation request the "
                                             "event loop keeps polling its sockets this many microseconds instead "
                                             "of sleeping, one core spinning, so that a loop's next request is read "
                                             "by a CPU still awake (not while calls run on worker threads or "
                                             "shards); 0: off")
    inline_call_us: float = Field(
        250.0, ge=0, description="an operation whose last run on that instance and batch took less than this "
                                 "many microseconds runs on the event loop instead of a worker thread "
                                 "(saves the thread hop for tiny synapses); 0 sends every call to a worker")
    inline_hop_factor: float = Field(
        4.0, ge=0, le=100, description="the inline bound rises to this many times the thread hop measured here "
                                       "(the median of recent hand-offs to a worker and back), at most 2 ms: where a "
                                       "hop is dear (a small VM: ~200 µs) a call that short costs less run than "
                                       "handed off; where it is cheap inline_call_us stays the bound; 0: fixed")
    cpu_async_dispatch: bool = Field(
        False, description="JAX's asynchronous dispatch on CPU (jax_cpu_enable_async_dispatch). Off, each CPU "
                           "computation runs in the calling thread instead of being handed to XLA's and waited for: "
                           "faster for loops of small calls (docs/benchmarks.md). Read when JAX starts its CPU "
                           "backend: in the in-process mode, only if the caller's JAX has not started it yet")
    gc_freeze: bool = Field(
        True, description="once ready, keep what start-up left alive (JAX's objects, the modules, restored "
                          "instances) out of Python's full garbage collections (gc.freeze): a full collection "
                          "otherwise walks them all, a pause of ~100 ms every few dozen packed calls. Off in the "
                          "in-process mode unless asked (it is the caller's process)")
    trim_when_idle: bool = Field(
        True, description="once the process goes idle after work, hand the memory freed in its C heap back to the "
                          "kernel (glibc's malloc_trim, ~30 ms): glibc keeps it in its pools otherwise (a soak's "
                          "server: 1,291 MB resident, 625 MB trimmed). Off in the in-process mode unless asked")
    device_budget_bytes: int | None = Field(
        None, ge=1, description="per device: state bytes instances may hold there; a create that would go over "
                                "is refused with 409 (default: no budget)")
    evict_idle_after_s: float = Field(
        0.0, ge=0, description="export, then delete, instances unused this long (to <state_dir>/evicted); 0: never")
    gpu_preallocate: bool = Field(
        False, description="let JAX take most GPU memory at start (XLA_PYTHON_CLIENT_PREALLOCATE); off suits a "
                           "shared host. Either XLA_ variable set in the environment wins")
    gpu_memory_fraction: float | None = Field(
        None, gt=0, le=1, description="with preallocation: the share of GPU memory JAX takes "
                                      "(XLA_PYTHON_CLIENT_MEM_FRACTION)")
    history_length: int = Field(
        256, ge=0, le=100_000, description="per instance: statistics samples kept after each learning call (evolve, "
                                           "step), for GET …/history and the /ui page; 0 keeps none")
    history_when_durability_off: bool = Field(
        False, description="keep the history for durability=off instances too (a sample costs one small device "
                           "call per learning call: ~15-30 µs on a CPU, felt by tiny memory-only loops)")
    backend: Literal["local", "ray"] = Field(
        "local", description="local: this process's JAX devices; ray: shard actors on a Ray cluster (docs/scaling.md)")
    ray_address: str | None = Field(
        None, description="ray backend: the cluster to join ('auto', 'ray://head:10001', 'head:6379'); none: start a "
                          "local one")
    ray_namespace: str = Field("synapse-serve", min_length=1, max_length=64,
                               description="ray backend: the namespace of this deployment's shard actors")
    ray_shards: int | None = Field(None, ge=1, le=4096, description="ray backend: shard actors (default: one per GPU "
                                                                     "of the cluster, or 2 without GPUs: 1 if its "
                                                                     "CPUs hold only one)")
    ray_shard_cpus: float = Field(1.0, ge=0, description="ray backend, CPU clusters: CPUs each shard reserves")
    ray_direct: bool = Field(
        True, description="ray backend: send each step's calls (call, read, write) to the shard over a socket of "
                          "its own instead of Ray's actor call (about 1 ms less per call); Ray carries the rest")
    ray_direct_host: str | None = Field(
        None, max_length=255, description="ray backend: the address the shards' direct channels listen on (default: "
                                          "each node's address in the Ray cluster)")
    ray_direct_port: int = Field(0, ge=0, le=65535, description="ray backend: shard i's direct channel listens on "
                                                                "this port + i (0: any free port)")
    ray_pin_cpus: bool = Field(
        True, description="ray backend, CPU clusters: pin each shard to ray_shard_cpus cores of its own (a whole "
                          "number), so shards on one node do not fight over every core")
    ray_restart_timeout_s: float = Field(
        120.0, gt=0, description="ray backend: how long a call waits for its dead shard to be restarted and restored")
    worker_threads: int = Field(32, ge=1, le=1024, description="threads running registry work (JAX calls); "
                                                                "calls on different instances run side by side")
    worker_threads_per_owner: int | None = Field(
        None, ge=1, le=1024, description="at most this many of one owner's calls on the worker threads at once (the "
                                         "rest wait without a thread), so one owner's queue never holds every worker "
                                         "from the others; default a quarter of worker_threads, at least 1")
