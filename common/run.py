"""The run harness every training script shares, written once.

  * flag checks as a table of `(flag, condition, requirement)` rows (`check_flags`), and the
    start-up every script does first (`start`); the flags a `--pretrained` run fixes
    (`take_pretrained`); `main`'s two phases with the final checkpoint (`run_phases`);
  * `--resume`: the saved Args of a run folder and its checkpoint, read and checked before any
    work (`resolve_resume`); display-only flags (`--progress`) still apply on resume;
  * the checkpoint payload: agent state dict, online buffer rows and cursor, counters, elapsed
    time, plus a script's own extras (numpy RNG, pending action), saved and restored by one
    function pair (`save_checkpoint`, `read_checkpoint` + `restore_checkpoint`);
  * `Session`: what a training loop asks of its run besides the algorithm: evaluations, reset
    seeds, when a checkpoint is due (every `--checkpoint-every` steps or `--checkpoint-minutes`
    minutes, whichever comes first), stop signals (SIGINT, SIGTERM, and SIGUSR1 / SIGUSR2, the
    time-limit warnings schedulers send: checkpoint within seconds, print the resume command,
    exit with `cli.EXIT_STOPPED`; a second Ctrl-C ends the process at once, printing nothing),
    and the closing summary line. A stop cuts update chunks short (`Session.updates`) and is
    never held up by an evaluation: one due, or under way, is owed to the resumed run, which
    does it first;
  * `--capture-video`: the rendering backend checked at start-up (`prepare_video`), and episode 0
    of every evaluation written to `videos/{phase}_{step}.mp4` (`Session.evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import serialization

from common import buffers, checkpoint
from common.cli import RunStopped, UserError
from common.evaluation import Evaluator, prepare_rendering
from common.logger import CHECKPOINT_FILE, CONFIG_FILE, Resumed, RunLogger, new_run_dir

DISPLAY_FLAGS = ("progress",)  # flags that change only what is shown; they apply on resume too


# --------------------------------------------------------------------------------------------
# Flag checks


Rule = tuple[str, Callable[[Any], bool], str]


def at_least(bound: float) -> Callable[[Any], bool]:
    return lambda value: value >= bound


def positive(value) -> bool:
    return value > 0


def widths(value) -> bool:
    return len(value) > 0 and min(value) > 0


def fraction(value) -> bool:
    return 0.0 <= value <= 1.0


def open_unit(value) -> bool:
    return 0.0 < value <= 1.0


# Flags every script has; each script adds its own rows.
RUN_RULES: list[Rule] = [
    ("seed", at_least(0), "must be >= 0"),
    ("offline_steps", at_least(0), "must be >= 0"),
    ("online_steps", at_least(0), "must be >= 0"),
    ("utd", at_least(1), "must be at least 1"),
    ("batch_size", at_least(1), "must be at least 1"),
    ("eval_every", at_least(1), "must be >= 1"),
    ("eval_episodes", at_least(1), "must be >= 1"),
    ("log_every", at_least(1), "must be >= 1"),
    ("checkpoint_every", at_least(1), "must be >= 1"),
    ("checkpoint_minutes", positive, "must be positive"),
    ("discount", open_unit, "must lie in (0, 1]"),
    ("tau", open_unit, "must lie in (0, 1]"),
]


def check_flags(args, rules: Iterable[Rule]) -> None:
    """Raise one UserError for the first flag that breaks its rule. Unset flags (None: the
    domain preset fills them later) pass; the check runs again after the preset. A RUN_RULES
    flag a script does not have (wsrl.py has no offline phase) is skipped."""
    for flag, condition, requirement in rules:
        value = getattr(args, flag, None)
        if value is not None and not condition(value):
            raise UserError(f"--{flag.replace('_', '-')} {requirement}, got {value}.")


# --------------------------------------------------------------------------------------------
# Run folders and --resume


def check_log_dir(log_dir: str) -> None:
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise UserError(f"--log-dir {log_dir} is a file, not a folder.")
    try:
        os.makedirs(log_dir, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --log-dir {log_dir}: {error.strerror}.") from None
    if not os.access(log_dir, os.W_OK):
        raise UserError(f"cannot write to --log-dir {log_dir}.")


def read_run_config(run_dir: str, args_type: type, algorithm: str, older_runs: dict[str, Any] | None = None,
                    retired: dict[str, Any] | None = None, hint: str = "") -> tuple[Any, dict[str, Any]]:
    """The Args a run folder was started with, and its whole config.json. `older_runs` gives the
    value of flags added since, for run folders written before them; `retired` names settings
    removed since, with the value under which an older run is still the same run: a folder that
    used another value is refused with one message (and `hint`)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no {CONFIG_FILE} there; is it a run folder of {algorithm}.py?")
    try:
        with open(path) as file:
            saved = {**(older_runs or {}), **json.load(file)}
        fields = {field.name for field in dataclasses.fields(args_type)}
        # JSON turns tuples (layer widths) into lists
        args = args_type(**{key: tuple(value) if isinstance(value, list) else value
                            for key, value in saved.items() if key in fields})
    except (json.JSONDecodeError, TypeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if saved.get("algorithm") != algorithm:
        raise UserError(f"{run_dir} is a run of {saved.get('algorithm')!r}, not {algorithm}.")
    used = [f"{name} = {saved[name]!r}" for name, value in (retired or {}).items()
            if name in saved and saved[name] != value]
    if used:
        raise UserError(f"{run_dir} was written by an older {algorithm}.py with settings this version no longer "
                        f"has ({', '.join(used)}); it cannot be continued. {hint}".rstrip())
    return args, saved


def resolve_resume(args, algorithm: str, extra_keys: tuple[str, ...] = (), older_runs: dict[str, Any] | None = None,
                   retired: dict[str, Any] | None = None, hint: str = ""):
    """(Args to run with, run folder to resume or None, its checkpoint or None).

    A resumed run takes its saved Args, except for the display-only flags given now; a missing
    or unreadable checkpoint is reported here, before any work.
    """
    if args.resume is None:
        return args, None, None
    run_dir = args.resume
    saved_args, _ = read_run_config(run_dir, type(args), algorithm, older_runs, retired, hint)
    defaults = type(args)()
    ignored = [f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(args)
               if field.name not in ("resume", *DISPLAY_FLAGS)
               and getattr(args, field.name) != getattr(defaults, field.name)]
    if ignored:
        print(f"note: --resume continues the run with its saved configuration; ignored: {', '.join(ignored)}.")
    display = {flag: getattr(args, flag) for flag in DISPLAY_FLAGS if hasattr(args, flag)}
    return dataclasses.replace(saved_args, **display), run_dir, read_checkpoint(run_dir, extra_keys)


def take_pretrained(args, pretrained_args, fields: Iterable[str]):
    """`args` with `fields` taken from the Args of the --pretrained run. A field given explicitly
    (not its default) with another value than that run's is refused with one message, before any
    work: the pre-trained networks fix it."""
    defaults = type(args)()
    for name in fields:
        given, found = getattr(args, name), getattr(pretrained_args, name)
        if given not in (getattr(defaults, name), found):
            raise UserError(f"--{name.replace('_', '-')} {given} differs from the --pretrained run's {found}: drop it.")
    return dataclasses.replace(args, **{name: getattr(pretrained_args, name) for name in fields})


def start(args, algorithm: str, validate: Callable[[Any], None], **resume_options):
    """Every script's first checks, before its task is resolved: --resume read (`resolve_resume`,
    with `resume_options`), the flags checked, the --capture-video backend and a new run's
    --log-dir. Returns (Args, run folder to resume or None, its checkpoint or None)."""
    args, run_dir, saved = resolve_resume(args, algorithm, **resume_options)
    validate(args)
    prepare_video(args)  # --capture-video: the rendering backend, checked before any work
    if run_dir is None:
        check_log_dir(args.log_dir)
    return args, run_dir, saved


def create_run_dir(args, algorithm: str) -> str:
    """A fresh run folder, its path printed at once (before anything is compiled)."""
    run_dir = new_run_dir(args.log_dir, algorithm, args.env, args.seed)
    print(f"Run folder: {run_dir}", flush=True)
    return run_dir


def resume_command(algorithm: str, run_dir: str) -> str:
    return f"python algorithms/{algorithm}.py --resume {run_dir}"


# --------------------------------------------------------------------------------------------
# Checkpoints


@dataclasses.dataclass
class Progress:
    """Counters a checkpoint must carry besides networks and buffers."""

    offline_step: int = 0
    online_step: int = 0
    episode: int = 0
    evaluations: int = 0
    next_checkpoint: int = 0
    pending_updates: int = 0  # updates owed to rows already in the buffer (a stop mid-trajectory)
    finished: bool = False
    # an evaluation a stop cut short or kept from starting: the resumed run does it first (phase, step)
    owed_phase: str = ""
    owed_step: int = -1


CHECKPOINT_KEYS = ("agent", "online_rows", "online_cursor", "progress", "elapsed")


def save_checkpoint(run_dir: str, agent, online: buffers.Buffer, progress: Progress, elapsed: float,
                    **extras) -> None:
    """Write the whole training state atomically; `extras` are a script's own entries."""
    payload = {
        "agent": serialization.to_state_dict(jax.device_get(agent)),
        "online_rows": buffers.filled_rows(online),
        "online_cursor": int(online.cursor),
        "progress": dataclasses.asdict(progress),
        "elapsed": elapsed,
        **extras,
    }
    checkpoint.save(os.path.join(run_dir, CHECKPOINT_FILE), payload)


def read_checkpoint(run_dir: str, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A run's checkpoint, checked for completeness before anything is built."""
    payload = checkpoint.load(os.path.join(run_dir, CHECKPOINT_FILE))
    missing = [key for key in (*CHECKPOINT_KEYS, *extra_keys) if key not in payload]
    if missing:
        raise UserError(f"cannot read checkpoint in {run_dir}: it lacks {', '.join(missing)}.")
    return payload


def restore_checkpoint(payload: dict[str, Any], run_dir: str, agent, online: buffers.Buffer):
    """(agent, online buffer, Progress, elapsed) from a payload read by `read_checkpoint`."""
    try:
        agent = serialization.from_state_dict(agent, payload["agent"])
        online = buffers.restore_rows(online, payload["online_rows"], payload["online_cursor"])
        fields = {field.name for field in dataclasses.fields(Progress)}
        progress = Progress(**{key: value for key, value in payload["progress"].items() if key in fields})
        return agent, online, progress, payload["elapsed"]
    except (KeyError, ValueError, TypeError) as error:
        raise UserError(f"checkpoint in {run_dir} does not match this run's configuration: {error}") from None


def load_agent_state(run_dir: str, agent):
    """`agent` with the parameters of a run's last checkpoint (for load_policy / load_agent)."""
    return serialization.from_state_dict(agent, read_checkpoint(run_dir)["agent"])


def strongly_typed(tree):
    """`tree` with every leaf a strongly typed array. A fresh agent holds Python ints (optimizer
    step counters) and weakly typed scalars that its first updates turn strong; each such change
    would cost the jitted step functions one more compilation."""
    return jax.tree_util.tree_map(lambda leaf: jax.numpy.asarray(leaf, jax.numpy.result_type(leaf)), tree)


def stack(trees):
    """The trees' leaves stacked on a new leading axis (an ensemble of agents as one pytree), in
    the first tree's structure (the optimizers of separately created TrainStates differ)."""
    columns = zip(*[jax.tree_util.tree_leaves(tree) for tree in trees])
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(trees[0]),
                                        [jax.numpy.stack(column) for column in columns])


_TREEDEFS: dict[Any, Any] = {}


def canonical(tree, key):
    """`tree` in the structure first seen for `key` in this process. A TrainState's optimizer and
    apply function are static parts of its structure, created anew by every run, and a new
    structure means a new compilation; `key` names everything they depend on (modules and
    learning rates), so runs in one process (tests, sweeps) reuse one another's compilations."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return jax.tree_util.tree_unflatten(_TREEDEFS.setdefault(key, treedef), leaves)


def rng_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def rng_from_state(state: str) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(state)
    return rng


def optional_array(value) -> np.ndarray:
    """A pending action for a checkpoint (an empty array stands for None)."""
    return np.zeros(0, np.float32) if value is None else np.asarray(value)


def array_or_none(value: np.ndarray) -> np.ndarray | None:
    return None if value.size == 0 else value


# --------------------------------------------------------------------------------------------
# Stops


class Stopped(Exception):
    """Raised after the checkpoint that a stop signal asked for has been written."""


class _EvaluationCut(Exception):
    """Raised inside an evaluation's policy once a stop is requested: the evaluation is owed."""


class StopSignals:
    """Stop signals set `received` instead of killing the run; the loop checkpoints at its next
    safe point, seconds away. SIGINT is Ctrl-C; SIGTERM is what schedulers send before a kill
    (pre-emption, scancel, a requeue) and what reproduce.py forwards; SIGUSR1 / SIGUSR2 are the
    warnings a scheduler sends ahead of a time limit (SLURM's `--signal=USR2@90`, which submitit
    and reproduce.py use, sends it to every process of the job step, this one included); without a
    handler they would kill the run with no checkpoint. After the first signal SIGINT is the
    system's again, so a second Ctrl-C ends the process at once, even inside a long jitted call."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    WHY = {"SIGINT": "Ctrl-C", "SIGTERM": "a stop request (scheduler pre-emption, scancel, a requeue, the runner)",
           "SIGUSR1": "a scheduler's time-limit warning", "SIGUSR2": "a scheduler's time-limit warning"}

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, number, frame):
        first = self.received is None
        self.received = signal.Signals(number).name
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if first:
            print(f"\n{self.received} received ({self.WHY[self.received]}): writing a checkpoint within seconds "
                  f"(press Ctrl-C again to stop at once, without saving).", flush=True)

    def __enter__(self):
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


# --------------------------------------------------------------------------------------------
# Videos


VIDEO_DIR = "videos"


def capture_video(args) -> bool:
    return bool(getattr(args, "capture_video", False))


def video_file(phase: str, step: int) -> str:
    """Where an evaluation's video goes, relative to the run folder: `videos/online_0005000.mp4`."""
    return os.path.join(VIDEO_DIR, f"{phase}_{step:07d}.mp4")


def prepare_video(args) -> None:
    """With --capture-video: choose the rendering backend (MUJOCO_GL=egl unless set) and render a
    test frame, so a machine that cannot render stops here, before data or compilation."""
    if capture_video(args):
        backend = prepare_rendering()
        print(f"--capture-video: episode 0 of every evaluation is recorded (MUJOCO_GL={backend}).", flush=True)


# --------------------------------------------------------------------------------------------
# Sessions


def episode_seed(seed: int, kind: int, index: int) -> int:
    """Reset seed of training episode (kind 0) or evaluation round (kind 1) number `index`."""
    return int(np.random.SeedSequence([seed, kind, index]).generate_state(1)[0])


class Session:
    """One run's folder, counters, logger, evaluator and stop handling, as its loop uses them."""

    def __init__(self, algorithm: str, args, run_dir: str, progress: Progress, logger: RunLogger, evaluator):
        self.algorithm, self.args, self.run_dir = algorithm, args, run_dir
        self.progress, self.logger, self.evaluator = progress, logger, evaluator
        self.stops = StopSignals()
        self._last_save = time.monotonic()
        self._last_evaluated: int | None = None
        # the script's evaluate(phase, step), given to `run`: only a script that settles an owed
        # evaluation on resume may have one cut short by a stop
        self._settle: Callable[[str, int], None] | None = None

    def evaluate(self, policy: Callable[[np.ndarray], np.ndarray], phase: str, step: int) -> None:
        """One evaluation, logged at `step`; with --capture-video its episode 0 goes to
        `videos/{phase}_{step}.mp4` (named in evaluations.jsonl; a resumed run that redoes an
        evaluation writes the same file again).

        Once a stop is requested, no evaluation starts and one under way is abandoned at its next
        environment step: it is recorded as owed (`Progress.owed_phase` / `owed_step`), the
        caller checkpoints before any update, and the resumed run does it first with the same
        policy and reset seeds. (Only for scripts that pass `evaluate` to `run`.)"""
        if self._settle is not None:
            if self.stop_requested:
                self._owe(phase, step)
                return
            policy = self._cut_on_stop(policy)
        seed = episode_seed(self.args.seed, 1, self.progress.evaluations)
        video = video_file(phase, step) if capture_video(self.args) else None
        try:
            if video is None:  # (the calls that the tests' stand-in evaluators and loggers take)
                metrics = self.evaluator(policy, seed)
            else:
                metrics = self.evaluator(policy, seed, os.path.join(self.run_dir, video))
        except _EvaluationCut:
            self._owe(phase, step)
            return
        self.progress.evaluations += 1
        self._last_evaluated = step
        if video is None:
            self.logger.evaluation(step, phase, metrics)
        else:
            self.logger.evaluation(step, phase, metrics, video=video)

    def _cut_on_stop(self, policy: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        def checked(observations):
            if self.stop_requested:
                raise _EvaluationCut
            return policy(observations)
        return checked

    def _owe(self, phase: str, step: int) -> None:
        self.progress.owed_phase, self.progress.owed_step = phase, step
        print(f"Evaluation at step {step} left to the resumed run (a stop was requested).", flush=True)

    @property
    def owes_evaluation(self) -> bool:
        return bool(self.progress.owed_phase)

    def evaluated_at(self, step: int) -> bool:
        """Whether this process has evaluated at `step` (the owed evaluation a resumed run settled
        first is the phase-opening one its loop would otherwise do again)."""
        return self._last_evaluated == step

    def updates(self, total: int, call: Callable[[int], Any], piece: int) -> tuple[int, Any]:
        """`total` updates as calls `call(n)` of at most `piece` updates each (the script's jitted
        chunk, returning its info), each waited for, so a stop is seen within one piece: the
        loop stops early and the caller checkpoints at once. The random stream is the same however
        the updates are split (each update splits its own key), so a resumed run stays exact.
        Returns (updates done, the last call's info; None when none ran)."""
        done, info = 0, None
        while done < total and not self.stop_requested:
            size = min(piece, total - done)
            info = jax.block_until_ready(call(size))  # dispatch is asynchronous: wait, then look for a stop
            done += size
        return done, info

    def reset_seed(self) -> int:
        return episode_seed(self.args.seed, 0, self.progress.episode)

    @property
    def stop_requested(self) -> bool:
        return self.stops.received is not None

    def checkpoint_due(self, step: int) -> bool:
        """Every --checkpoint-every steps, every --checkpoint-minutes, or when a stop was asked for."""
        minutes = (time.monotonic() - self._last_save) / 60.0
        return step >= self.progress.next_checkpoint or minutes >= self.args.checkpoint_minutes or self.stop_requested

    def save(self, step: int, agent, online: buffers.Buffer, **extras) -> None:
        """Checkpoint at `step`; raises Stopped afterwards when a stop was asked for."""
        every = self.args.checkpoint_every
        self.progress.next_checkpoint = (step // every + 1) * every
        self.logger.sync()
        save_checkpoint(self.run_dir, agent, online, self.progress, self.logger.elapsed(), **extras)
        self._last_save = time.monotonic()
        if self.stop_requested and not self.progress.finished:
            raise Stopped

    def log_training(self, info: dict[str, Any], step: int) -> None:
        self.logger.scalars({**{f"train/{name}": value for name, value in info.items()},
                             "time/sps": self.logger.steps_per_second()}, step)

    def run(self, phases: Callable[[], None], save_final: Callable[[], None],
            evaluate: Callable[[str, int], None] | None = None) -> None:
        """Run the loop with stop handling, write the final checkpoint and print the summary.
        A signal ends in RunStopped (the CLI exits with EXIT_STOPPED) after its checkpoint.

        `evaluate(phase, step)`: the script's evaluation of its current agent. Given, a stop never
        waits for an evaluation (see `evaluate`), and an evaluation owed by the checkpoint this run
        resumed from is done here, before any update. A stop before that leaves the checkpoint
        on disk as it is (it already holds this state)."""
        self._settle = evaluate
        with self.stops:
            try:
                self._settle_owed()
                phases()
                self.progress.finished = not self.owes_evaluation  # else save_final stops, owing it
                save_final()
            except Stopped:
                self._close()
                raise RunStopped(f"stopped by {self.stops.received}; checkpoint written. Continue with:\n  "
                                 f"{resume_command(self.algorithm, self.run_dir)}") from None
        self._close()

    def _settle_owed(self) -> None:
        if not self.owes_evaluation:
            return
        if self.stop_requested:
            raise Stopped
        phase, step = self.progress.owed_phase, self.progress.owed_step
        self.progress.owed_phase, self.progress.owed_step = "", -1
        self._settle(phase, step)
        if self.owes_evaluation:  # cut short again: nothing moved, the checkpoint on disk holds this state
            raise Stopped

    def _close(self) -> None:
        self.logger.close()
        self.evaluator.close()
        print(self.logger.summary(), flush=True)


def run_phases(run, offline_phase: Callable, online_phase: Callable) -> str:
    """A script's `main` once `run` is built: its two phases under the session's stop handling,
    then the final checkpoint at the last step (`Session.run`). Returns the run folder."""
    def phases():
        offline_phase(run)
        online_phase(run)

    run.session.run(phases, lambda: run.checkpoint(run.args.offline_steps + run.args.online_steps), run.evaluate)
    return run.session.run_dir


def open_session(algorithm: str, args, task, run_dir: str, progress: Progress, elapsed: float | None,
                 dims: tuple[int, int], make_env: Callable, scoring, **extra_config) -> Session:
    """The logger (config.json and the hyperparameter table for a new run, trimmed logs for a
    resumed one), the evaluation envs (env 0 rendering, with --capture-video) and the Session.
    `elapsed` is None for a new run."""
    resumed = None
    offline_steps = getattr(args, "offline_steps", 0)  # fine-tuning scripts (wsrl.py) have no offline phase
    if elapsed is not None:
        resumed = Resumed(progress.offline_step + progress.online_step, progress.evaluations, elapsed)
        print(f"Resuming {run_dir} at step {resumed.step}.")
    record = {"algorithm": algorithm, **dataclasses.asdict(args), "domain": task.domain,
              "dataset_id": task.dataset_id, "observation_dim": dims[0], "action_dim": dims[1], **extra_config}
    logger = RunLogger(run_dir, record, offline_steps + args.online_steps, resumed, args.progress)
    evaluator = Evaluator(make_env, args.eval_episodes, scoring, record=capture_video(args))
    return Session(algorithm, args, run_dir, progress, logger, evaluator)
