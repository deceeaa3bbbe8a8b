"""Env state snapshots: what the next env steps depend on, saved without pickle.

An exact ``--resume`` needs the envs to continue where they stopped: the same episode, step
count, physics and random stream. Gymnasium has no state API, so this module reads each layer
of a sub-env's wrapper chain (``RecordEpisodeStatistics -> TimeLimit -> OrderEnforcing ->
PassiveEnvChecker -> CartPoleEnv``) through a small registry, :data:`RULES`: for each class the
attributes that change while it runs (saved by value), the ones its constructor sets from the
config (rebuilt identically on resume, not saved), and, where plain values do not suffice, a
getter and setter (the env's ``np_random``, MuJoCo's ``MjData``, deques). Nothing is pickled:
values become JSON (``state.json``) or NumPy arrays (tensors in ``envs.safetensors``), because
checkpoints are user files.

Any attribute a rule does not name, any class without a rule and any value that is not plain
makes :func:`capture` raise :class:`SnapshotError` with the reason; the trainer then records
``envs_exact: false`` and restarts the envs from fresh episodes on resume, as before. So a new
Gymnasium version that adds state to a class falls back loudly instead of resuming wrongly.

Captured exactly: the classic-control envs (CartPole, Pendulum, Acrobot, MountainCar and its
continuous twin), Gymnasium's MuJoCo envs (when ``mujoco`` is installed), the wrappers
:func:`cliprail.rl.envs.make_env_fn` uses for them, and :class:`~cliprail.rl.envs.EpisodicLife`.
Not captured: Atari (the emulator state exists only as ale-py's binary serialisation, whose
C++ reader trusts its input, so cliprail does not load it from a file), envs in worker
processes (``--vector async``), and any class not in :data:`RULES`.

Example::

    snap = capture(envs, obs)              # EnvSnapshot: JSON meta + named arrays
    tensors, meta = snap.to_checkpoint()   # for save_checkpoint
    ...                                    # later, in a fresh process, same config:
    envs.reset(seed=s)                     # a fresh vector env, reset once
    obs = restore(envs, EnvSnapshot.from_checkpoint(tensors, meta))
"""

from __future__ import annotations

import inspect
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.envs.classic_control import (
    AcrobotEnv,
    CartPoleEnv,
    Continuous_MountainCarEnv,
    MountainCarEnv,
    PendulumEnv,
)
from gymnasium.wrappers import (
    OrderEnforcing,
    PassiveEnvChecker,
    RecordEpisodeStatistics,
    TimeLimit,
)

from cliprail.rl.ale_vector import ALEVectorEnv
from cliprail.rl.envs import EpisodicLife, FireReset
from cliprail.rl.vector import SameStepSyncVectorEnv

FORMAT = 1  # bump when the layout of a snapshot changes; restore refuses other versions


class SnapshotError(Exception):
    """An env's state cannot be captured or restored exactly; the message says why."""


# --- values --------------------------------------------------------------------------------
# A saved value is tagged: {"json": v} for None, bool, int, float, str and JSON trees (Python's
# JSON writes floats with repr, which reads back bit for bit; inf and nan as Infinity/NaN);
# {"array": key} for an ndarray and {"scalar": key} for a NumPy scalar, whose dtype must
# survive (NumPy 2: float + float32 -> float32, but float64 + float32 -> float64); {"tuple":
# [tagged, ...]} for a tuple of these.
_JSON_SCALARS = (type(None), bool, int, float, str)


class _Writer:
    """Collects the arrays of one snapshot while values are encoded."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def encode(self, key: str, value: Any) -> dict[str, Any]:
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise SnapshotError(f"{key} is an object array")
            self.arrays[key] = np.array(value, copy=True)
            return {"array": key}
        if isinstance(value, np.generic):
            self.arrays[key] = np.asarray(value)
            return {"scalar": key}
        if isinstance(value, _JSON_SCALARS) and not isinstance(value, np.generic):
            return {"json": value}
        if isinstance(value, dict | list) and _is_json_tree(value):
            return {"json": value}
        if isinstance(value, tuple):  # e.g. MountainCar's (position, velocity)
            return {"tuple": [self.encode(f"{key}.{j}", v) for j, v in enumerate(value)]}
        raise SnapshotError(f"{key} holds a {type(value).__name__}, which cliprail cannot save")


def _is_json_tree(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json_tree(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_is_json_tree(v) for v in value)
    return isinstance(value, _JSON_SCALARS) and not isinstance(value, np.generic)


def _decode(tagged: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    if "json" in tagged:
        return tagged["json"]
    if "tuple" in tagged:
        return tuple(_decode(t, arrays) for t in tagged["tuple"])
    key = tagged.get("array", tagged.get("scalar"))
    if key not in arrays:
        raise SnapshotError(f"array {key!r} is missing from the snapshot")
    if "scalar" in tagged:
        if arrays[key].ndim != 0:
            raise SnapshotError(f"{key} should be a scalar, has shape {arrays[key].shape}")
        return arrays[key][()]  # a NumPy scalar of the saved dtype
    return np.array(arrays[key], copy=True)


# --- the registry --------------------------------------------------------------------------
Values = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    """How one class of a wrapper chain is saved.

    ``state``: attributes saved and restored by value (plain values only). ``fixed``: set by
    the constructor from the config, rebuilt identically on resume, not saved. ``custom``:
    attributes that ``get`` (obj -> values to save) and ``put`` (obj, saved values) handle.
    Attributes named nowhere make :func:`capture` refuse the env.
    """

    state: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    custom: tuple[str, ...] = ()
    get: Callable[[Any], Values] | None = None
    put: Callable[[Any, Values], None] | None = None
    fixed_of: Callable[[Any], set[str]] | None = None  # more fixed names, read off the object

    def known(self, obj: Any) -> set[str]:
        extra = self.fixed_of(obj) if self.fixed_of is not None else set()
        return {*self.state, *self.fixed, *self.custom, *extra}


# Set by gym.Wrapper.__init__ and RecordConstructorArgs: the chain and lazily cached spaces.
_WRAPPER_FIXED = (
    "env",
    "_action_space",
    "_observation_space",
    "_metadata",
    "_cached_spec",
    "_saved_kwargs",
    "_reward_range",
)
# Set on every gym.Env by gym.make, plus the classic-control renderers (None unless rendering).
_ENV_FIXED = (
    "action_space",
    "observation_space",
    "spec",
    "render_mode",
    "metadata",
    "screen",
    "clock",
    "isopen",
    "screen_width",
    "screen_height",
    "screen_dim",
)


def _get_np_random(env: gym.Env) -> Values:
    rng = env.unwrapped._np_random  # None until the first reset
    return {
        "np_random": None if rng is None else rng.bit_generator.state,  # JSON: PCG64's ints
        "np_random_seed": env.unwrapped._np_random_seed,
    }


def _put_np_random(env: gym.Env, values: Values) -> None:
    u = env.unwrapped
    state = values["np_random"]
    if state is None:
        u._np_random = None
    else:
        bit_gen = getattr(np.random, str(state["bit_generator"]), None)
        if not (isinstance(bit_gen, type) and issubclass(bit_gen, np.random.BitGenerator)):
            raise SnapshotError(f"unknown bit generator {state['bit_generator']!r}")
        rng = np.random.Generator(bit_gen())
        rng.bit_generator.state = state
        u._np_random = rng
    u._np_random_seed = values["np_random_seed"]


def _env_rule(state: tuple[str, ...], fixed: tuple[str, ...] = ()) -> Rule:
    """A ``gym.Env`` whose step reads ``state`` and its ``np_random``."""
    return Rule(
        state=state,
        fixed=(*_ENV_FIXED, *fixed),
        custom=("_np_random", "_np_random_seed"),
        get=_get_np_random,
        put=_put_np_random,
    )


# RecordEpisodeStatistics: the running return and length of the episode in progress, and the
# last episodes' queues (Gymnasium's own summary; cliprail reads the per-episode info). Its
# clock is wall time, meaningless in another process: the episode's elapsed time is saved
# and the start time set back by it on restore, so ``t`` excludes the downtime.
def _get_episode_stats(w: RecordEpisodeStatistics) -> Values:
    return {
        "elapsed": time.perf_counter() - w.episode_start_time,
        "time_queue": np.asarray(list(w.time_queue), np.float64),
        "return_queue": np.asarray(list(w.return_queue), np.float64),
        "length_queue": np.asarray(list(w.length_queue), np.int64),
    }


def _put_episode_stats(w: RecordEpisodeStatistics, values: Values) -> None:
    w.episode_start_time = time.perf_counter() - float(values["elapsed"])
    for name in ("time_queue", "return_queue", "length_queue"):
        old: deque[Any] = getattr(w, name)
        setattr(w, name, deque(np.asarray(values[name]).tolist(), maxlen=old.maxlen))


# PassiveEnvChecker: its checks only warn, once per process. ``_previous_data`` holds the last
# (obs, info) objects to warn if the next call returns the same objects again, which cannot
# mean anything across processes; the restored checker counts its checks as done.
def _put_checker(w: PassiveEnvChecker, values: Values) -> None:
    w.checked_reset = w.checked_step = w.checked_data_reuse = True
    w._previous_data = None


def _mujoco_fixed(env: Any) -> set[str]:
    """Gymnasium's MuJoCo envs keep each constructor argument ``x`` as ``self._x``."""
    return {f"_{p}" for p in inspect.signature(type(env).__init__).parameters}


# MjData: the integration state (mj_getState: time, qpos, qvel, act, warm start, controls,
# applied forces, mocap, plugin state; MuJoCo's own definition of what mj_step reads) plus
# every float array whose size the model fixes. The second part matters because after mj_step
# the kinematics (xpos, xipos, cinert, cvel...) are those at the *start* of the last substep,
# and envs read them before the next step (Ant's and Humanoid's x velocity): restoring only
# the integration state and calling mj_forward changes Ant-v5's next reward (checked).
# Contact and constraint arrays (sized by this step's contacts) and integer index arrays are
# not saved: mj_step recomputes them first thing, and integers read from a file could index
# out of bounds in C.
def _mjdata_float_arrays(data: Any, fresh: Any) -> Iterator[str]:
    for name in dir(data):
        if name.startswith("_"):
            continue
        value = getattr(data, name, None)
        if (
            isinstance(value, np.ndarray)
            and value.dtype == np.float64
            and value.size
            and getattr(fresh, name).shape == value.shape  # fixed by the model, not by ncon
        ):
            yield name


def _get_mujoco(env: Any) -> Values:
    import mujoco

    m, d = env.model, env.data
    sig = mujoco.mjtState.mjSTATE_INTEGRATION
    integration = np.empty(mujoco.mj_stateSize(m, sig), np.float64)
    mujoco.mj_getState(m, d, integration, sig)
    values: Values = {"integration": integration}
    for name in _mjdata_float_arrays(d, mujoco.MjData(m)):
        values[f"data.{name}"] = getattr(d, name).copy()
    return {**values, **_get_np_random(env)}


def _put_mujoco(env: Any, values: Values) -> None:
    import mujoco

    m, d = env.model, env.data
    sig = mujoco.mjtState.mjSTATE_INTEGRATION
    integration = np.asarray(values["integration"], np.float64)
    if integration.shape != (mujoco.mj_stateSize(m, sig),):
        raise SnapshotError(f"MuJoCo state of size {integration.size} does not fit this model")
    arrays = {k.removeprefix("data."): v for k, v in values.items() if k.startswith("data.")}
    for name, arr in arrays.items():  # check everything before writing anything
        target = getattr(d, name, None)
        if not isinstance(target, np.ndarray) or target.dtype != np.float64:
            raise SnapshotError(f"MjData.{name} is not a float array in this MuJoCo")
        if target.shape != np.shape(arr):
            raise SnapshotError(f"MjData.{name} has shape {target.shape}, saved {np.shape(arr)}")
    mujoco.mj_setState(m, d, integration, sig)
    for name, arr in arrays.items():
        getattr(d, name)[...] = arr
    _put_np_random(env, values)


# MujocoEnv.__init__'s attributes (the model, renderer settings, initial qpos and qvel).
_MUJOCO_FIXED = (
    *_ENV_FIXED,
    "fullpath",
    "frame_skip",
    "width",
    "height",
    "model",
    "init_qpos",
    "init_qvel",
    "camera_id",
    "camera_name",
    "mujoco_renderer",
    "observation_structure",
    "_ezpickle_args",
    "_ezpickle_kwargs",
)


def _mujoco_rule(state: tuple[str, ...] = ()) -> Rule:
    """A Gymnasium MuJoCo env; ``state``: what its ``reset_model`` sets besides MjData."""
    return Rule(
        state=state,
        fixed=_MUJOCO_FIXED,
        custom=("data", "_np_random", "_np_random_seed"),
        get=_get_mujoco,
        put=_put_mujoco,
        fixed_of=_mujoco_fixed,
    )


# By class name: v4 and v5 share these names (and the attributes).
_MUJOCO_RULES = {
    "ReacherEnv": _mujoco_rule(("goal",)),
    "PusherEnv": _mujoco_rule(("goal_pos", "cylinder_pos")),
}
_MUJOCO_DEFAULT = _mujoco_rule()

# The classic-control constructors' physical constants and bounds.
_CARTPOLE_FIXED = (
    "gravity",
    "masscart",
    "masspole",
    "total_mass",
    "length",
    "polemass_length",
    "force_mag",
    "tau",
    "kinematics_integrator",
    "theta_threshold_radians",
    "x_threshold",
    "_sutton_barto_reward",
)
_MOUNTAIN_CAR_FIXED = (
    "min_position",
    "max_position",
    "max_speed",
    "goal_position",
    "goal_velocity",
    "force",
    "gravity",
    "low",
    "high",
)
_CONTINUOUS_MOUNTAIN_CAR_FIXED = (
    "min_action",
    "max_action",
    "min_position",
    "max_position",
    "max_speed",
    "goal_position",
    "goal_velocity",
    "power",
    "low_state",
    "high_state",
)

RULES: dict[type, Rule] = {
    # --- wrappers (gymnasium.make's, make_env_fn's, cliprail's) ---
    RecordEpisodeStatistics: Rule(
        state=("episode_count", "episode_returns", "episode_lengths"),
        fixed=(*_WRAPPER_FIXED, "_stats_key"),
        custom=("episode_start_time", "time_queue", "return_queue", "length_queue"),
        get=_get_episode_stats,
        put=_put_episode_stats,
    ),
    TimeLimit: Rule(state=("_elapsed_steps",), fixed=(*_WRAPPER_FIXED, "_max_episode_steps")),
    OrderEnforcing: Rule(
        state=("_has_reset",), fixed=(*_WRAPPER_FIXED, "_disable_render_order_enforcing")
    ),
    PassiveEnvChecker: Rule(
        state=("checked_render", "close_called"),
        fixed=_WRAPPER_FIXED,
        custom=("checked_reset", "checked_step", "checked_data_reuse", "_previous_data"),
        put=_put_checker,
    ),
    EpisodicLife: Rule(state=("lives", "game_over"), fixed=_WRAPPER_FIXED),
    FireReset: Rule(fixed=_WRAPPER_FIXED),
    # --- classic control: the physical state, the termination latch, the RNG ---
    CartPoleEnv: _env_rule(("state", "steps_beyond_terminated"), _CARTPOLE_FIXED),
    PendulumEnv: _env_rule(("state", "last_u"), ("max_speed", "max_torque", "dt", "g", "m", "l")),
    AcrobotEnv: _env_rule(("state",)),  # its constants are class attributes
    MountainCarEnv: _env_rule(("state",), _MOUNTAIN_CAR_FIXED),
    Continuous_MountainCarEnv: _env_rule(("state",), _CONTINUOUS_MOUNTAIN_CAR_FIXED),
}

# Classes known *not* to be capturable, with the reason (any other unknown class gets a
# generic one).
UNSUPPORTED: dict[str, str] = {
    # e.g. Stella's Cartridge3E::load writes as many RAM bytes as the stream says it holds
    "AtariEnv": "the ALE emulator state exists only as ale-py's binary serialisation, whose "
    "C++ reader trusts its input, so cliprail does not load it from a checkpoint file",
}


def rule_for(obj: Any) -> Rule | None:
    """The rule of ``obj``'s exact class (a subclass may add state, so no inheritance), or of
    Gymnasium's own MuJoCo envs; None when there is none."""
    rule = RULES.get(type(obj))
    if rule is not None:
        return rule
    if type(obj).__module__.startswith("gymnasium.envs.mujoco.") and hasattr(obj, "data"):
        return _MUJOCO_RULES.get(type(obj).__name__, _MUJOCO_DEFAULT)
    return None


def layers(env: gym.Env) -> list[Any]:
    """The wrapper chain of ``env``, outermost first, ending with the unwrapped env."""
    chain = [env]
    while isinstance(chain[-1], gym.Wrapper):
        chain.append(chain[-1].env)
    return chain


def _checked_rule(obj: Any) -> Rule:
    name = type(obj).__name__
    rule = rule_for(obj)
    if rule is None:
        why = UNSUPPORTED.get(name, "cliprail has no rule for its state")
        raise SnapshotError(f"{type(obj).__module__}.{name}: {why}")
    unknown = sorted(set(vars(obj)) - rule.known(obj))
    if unknown:
        raise SnapshotError(
            f"{name} has attributes cliprail does not know how to save: {', '.join(unknown)}"
        )
    return rule


def _capture_layer(obj: Any, prefix: str, writer: _Writer) -> dict[str, Any]:
    rule = _checked_rule(obj)
    values = {name: getattr(obj, name) for name in rule.state}
    saved = {name: writer.encode(f"{prefix}.{name}", v) for name, v in values.items()}
    extra = rule.get(obj) if rule.get is not None else {}
    custom = {name: writer.encode(f"{prefix}.{name}", v) for name, v in extra.items()}
    return {"class": type(obj).__name__, "state": saved, "custom": custom}


# --- vector envs ---------------------------------------------------------------------------
def _sub_envs(envs: gym.vector.VectorEnv) -> list[gym.Env]:
    if isinstance(envs, SameStepSyncVectorEnv | gym.vector.SyncVectorEnv):
        return list(envs.envs)
    if isinstance(envs, gym.vector.AsyncVectorEnv):
        raise SnapshotError(
            "--vector async: the sub-envs live in worker processes; exact resume needs "
            "--vector sync"
        )
    if isinstance(envs, ALEVectorEnv):
        raise SnapshotError(
            "--vector ale: the games live in ale-py's C++ vector env, whose state cannot be "
            "saved; exact resume needs --vector sync"
        )
    raise SnapshotError(f"{type(envs).__name__}: cliprail has no rule for this vector env")


def _vector_state(envs: gym.vector.VectorEnv) -> dict[str, Any]:
    """What the vector env itself carries between steps: SameStepSyncVectorEnv nothing (its
    buffers are overwritten by every step); Gymnasium's SyncVectorEnv which envs autoreset on
    their next step (NEXT_STEP mode)."""
    if isinstance(envs, gym.vector.SyncVectorEnv):
        return {
            "autoreset_mode": envs.autoreset_mode.value,
            "autoreset_envs": [bool(x) for x in envs._autoreset_envs],
        }
    return {}


@dataclass
class EnvSnapshot:
    """The state of every sub-env of a vector env and the observation to continue from.

    ``meta`` is JSON (vector class, per env the chain of layers and their tagged values);
    ``arrays`` holds the arrays it refers to by key, the current observation under ``"obs"``.
    """

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and the JSON meta for a checkpoint (per rank: :mod:`cliprail.resume` adds
        the ``.rank{r}`` suffixes)."""
        tensors = {}
        for key, arr in self.arrays.items():
            try:
                # copy(order="C"), not ascontiguousarray: that turns a 0-d array into shape (1,)
                tensors[key] = torch.from_numpy(arr.copy(order="C"))
            except TypeError as exc:  # a dtype torch has no tensor for
                raise SnapshotError(f"{key}: {exc}") from None
        return tensors, self.meta

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> EnvSnapshot:
        """The snapshot saved by :meth:`to_checkpoint` (``tensors``: the ``envs`` group)."""
        keys = meta.get("arrays", []) if isinstance(meta, dict) else None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise SnapshotError("the env state's list of arrays is malformed")
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise SnapshotError(f"env arrays missing from the checkpoint: {', '.join(missing)}")
        return cls(meta, {k: tensors[k].numpy().copy() for k in keys})


def capture(envs: gym.vector.VectorEnv, obs: np.ndarray) -> EnvSnapshot:
    """Snapshot every sub-env of ``envs`` and ``obs`` (the raw observation the next step
    continues from). Raises :class:`SnapshotError` naming the first thing that cannot be saved
    exactly."""
    writer = _Writer()
    chains = []
    subs = _sub_envs(envs)
    for obj in layers(subs[0]):  # name the layer that decides it (AtariEnv, not its wrappers)
        if type(obj).__name__ in UNSUPPORTED and rule_for(obj) is None:
            _checked_rule(obj)
    for i, env in enumerate(subs):
        chain = [
            _capture_layer(obj, f"env{i}.{d}.{type(obj).__name__}", writer)
            for d, obj in enumerate(layers(env))
        ]
        chains.append(chain)
    writer.arrays["obs"] = np.array(obs, copy=True)
    meta = {
        "format": FORMAT,
        "vector": type(envs).__name__,
        "vector_state": _vector_state(envs),
        "envs": chains,
        "arrays": sorted(writer.arrays),
    }
    json.dumps(meta)  # fail here, not halfway through writing a checkpoint
    return EnvSnapshot(meta, writer.arrays)


_Plan = list[tuple[Any, Rule, Values, Values]]  # (layer, its rule, state, custom values)


def restore(envs: gym.vector.VectorEnv, snap: EnvSnapshot) -> np.ndarray:
    """Put ``snap`` into ``envs`` (built from the same config and reset once); returns the
    observation to continue from.

    The vector env, every chain of classes, every rule's fields, the observation and every
    value are checked and decoded before anything is written; a setter's own checks (MuJoCo
    array shapes) come later, so after a :class:`SnapshotError` reset the envs before use.
    """
    try:
        plan = _plan(envs, snap)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise SnapshotError(f"the saved env state is malformed: {exc!r}") from None
    try:
        for obj, rule, state, custom in plan:
            for name, value in state.items():
                setattr(obj, name, value)
            if rule.put is not None:
                rule.put(obj, custom)
        if isinstance(envs, gym.vector.SyncVectorEnv):
            saved = snap.meta["vector_state"]["autoreset_envs"]
            envs._autoreset_envs = np.asarray(saved, bool)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"the saved env state does not fit: {exc!r}") from None
    return np.array(snap.arrays["obs"], copy=True)


def _plan(envs: gym.vector.VectorEnv, snap: EnvSnapshot) -> _Plan:
    """Check ``snap`` against ``envs`` and decode every value; writes nothing."""
    meta = snap.meta
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"env snapshot format {meta.get('format')!r}, expected {FORMAT}")
    subs = _sub_envs(envs)
    if meta["vector"] != type(envs).__name__:
        raise SnapshotError(
            f"saved from a {meta['vector']}, restoring into a {type(envs).__name__}"
        )
    if len(meta["envs"]) != len(subs):
        raise SnapshotError(f"saved {len(meta['envs'])} envs, this run has {len(subs)}")
    if isinstance(envs, gym.vector.SyncVectorEnv):
        vector_state = meta["vector_state"]
        if vector_state["autoreset_mode"] != envs.autoreset_mode.value:
            raise SnapshotError(f"saved with autoreset mode {vector_state['autoreset_mode']}")
        if len(vector_state["autoreset_envs"]) != len(subs):
            raise SnapshotError("the saved autoreset flags do not fit these envs")
    obs = snap.arrays.get("obs")
    space = envs.observation_space
    if obs is None or obs.shape != space.shape or obs.dtype != space.dtype:
        raise SnapshotError("the saved observation does not fit this vector env")
    plan: _Plan = []
    for i, (env, saved_chain) in enumerate(zip(subs, meta["envs"], strict=True)):
        chain = layers(env)
        names = [type(obj).__name__ for obj in chain]
        if names != [layer["class"] for layer in saved_chain]:
            raise SnapshotError(
                f"env {i}: saved wrappers {[x['class'] for x in saved_chain]}, built {names}"
            )
        for obj, layer in zip(chain, saved_chain, strict=True):
            rule = _checked_rule(obj)
            if set(layer["state"]) != set(rule.state):
                raise SnapshotError(f"{type(obj).__name__}: saved fields differ from its rule")
            state = {k: _decode(v, snap.arrays) for k, v in layer["state"].items()}
            custom = {k: _decode(v, snap.arrays) for k, v in layer["custom"].items()}
            plan.append((obj, rule, state, custom))
    return plan


__all__ = ["RULES", "EnvSnapshot", "Rule", "SnapshotError", "capture", "layers", "restore"]
