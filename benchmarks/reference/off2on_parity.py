"""One fine-tuning update of shlee94/Off2OnRL's `OursTrainer.train_from_torch` (PyTorch), with
every input and output written to a file, for benchmarks/parity.py.

Run by parity.py with the Python of the Off2On virtual environment (torch, CPU); it imports
nothing of this project but `parity_io.py` beside it. The networks are the official ones, built
as `rlkit/examples/ours.py` builds them: `ParallelMlp` twin critic ensembles (qf1, qf2 and their
targets, the targets loaded from the critics), N rlkit `TanhGaussianPolicy` members combined by
`ParallelTanhGaussianPolicy`, and the density-ratio network `ConcatMlp` with its last bias
filled with 1. rlkit's own initialisation draws them (torch seed `seed`); no checkpoint is
loaded (the update does not care where the parameters come from). The case's `policy` and
`density` settings then overwrite a few of them (benchmarks/parity.py, off2on_cases).

It reads three batches from `--input` (batch/rl_*, batch/offline_*, batch/online_*) and, for
each case of `--config`, writes:

  CASE/init/{policy,qf1,qf2,target_qf1,target_qf2,weight_net}/...  state_dict entries, "." as "/"
  CASE/init/log_alpha
  CASE/out/{q1,q2,member_mean,member_log_std,policy_mean,policy_std,w_offline,w_online,w_rl}
                                   the networks on the batches, before the update
  CASE/info/...                    the update's statistics, its TD target and new priorities
  CASE/updated/...                 the parameters after it (the same names as init/)
  CASE/dist/...                    per random key (torch seed 1000 + k), a fresh trainer from
                                   the same parameters: its statistics and a few summaries of the
                                   updated networks on the batch

Stand-ins and shims (the update itself runs unchanged):
  * `gym`, `d4rl`, `dateutil` and `torchvision` are stand-in modules (imported at top level by
    ours.py, where ParallelMlp and ParallelTanhGaussianPolicy are defined, and by rlkit's
    logger and network package; the update uses none of them);
  * `np.int` (removed in numpy 1.24; `compute_loss` casts the tree indices with it) is `int`;
  * the trainer's `env` is an object with only `action_space.shape` (its target entropy);
  * its `priority_replay_buffer` records `update_priorities(indices, priorities)`;
  * its `qf_criterion` (`nn.MSELoss(reduction="none")`) is wrapped by an observer that keeps the
    TD target it is given and returns the loss unchanged.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import types

import numpy as np

from parity_io import load, save, subtree

NETWORKS = ("policy", "qf1", "qf2", "target_qf1", "target_qf2", "weight_net")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="checkout of shlee94/Off2OnRL")
    parser.add_argument("--input", required=True, help=".npz holding batch/<key> arrays")
    parser.add_argument("--output", required=True, help=".npz to write")
    parser.add_argument("--config", required=True, help="JSON list of cases")
    return parser.parse_args(argv)


class _Anything(types.ModuleType):
    """A stand-in module: every attribute is a further stand-in (classes, functions, submodules)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Anything(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        return self

    def __mro_entries__(self, bases):
        return (object,)


# Third-party modules imported at top level on the way to OursTrainer and the networks, none
# of them by the update: gym and d4rl (ours.py's environment and dataset), dateutil (rlkit's
# logger's time zone), torchvision (rlkit.torch.networks' pretrained CNN).
STAND_INS = ("gym", "gym.spaces", "d4rl", "dateutil", "dateutil.tz", "torchvision", "torchvision.models")


def shims(source: str):
    """The stand-ins and shims of the module docstring; returns (ours.py's module, rlkit's
    OursTrainer, TanhGaussianPolicy, ConcatMlp, pytorch_util)."""
    np.int = int  # compute_loss: .astype(np.int)
    sys.path.insert(0, os.path.join(source, "rlkit"))
    for name in STAND_INS:
        sys.modules[name] = _Anything(name)
    import rlkit.torch.pytorch_util as ptu
    ptu.set_gpu_mode(False)
    from rlkit.torch.networks import ConcatMlp
    from rlkit.torch.sac.ours import OursTrainer
    from rlkit.torch.sac.policies import TanhGaussianPolicy
    spec = importlib.util.spec_from_file_location("off2on_examples_ours", os.path.join(source, "rlkit", "examples",
                                                                                       "ours.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example, OursTrainer, TanhGaussianPolicy, ConcatMlp, ptu


class PriorityRecorder:
    """The trainer's priority buffer: keeps what `update_priorities` is given."""

    def __init__(self):
        self.calls = []

    def update_priorities(self, indices, priorities):
        self.calls.append((np.asarray(indices), np.asarray(priorities)))


class TargetObserver:
    """Wraps the trainer's qf_criterion: the same loss, and the target it was given kept."""

    def __init__(self, criterion):
        self.criterion, self.targets = criterion, []

    def __call__(self, prediction, target):
        self.targets.append(target.detach().clone())
        return self.criterion(prediction, target)


def build_networks(settings: dict, dims: tuple[int, int], official) -> dict:
    """The official networks for a case, as ours.py builds them, then the case's overrides."""
    import torch
    example, _, TanhGaussianPolicy, ConcatMlp, _ = official
    observation_dim, action_dim = dims
    width, layers, members = settings["hidden"], settings["layers"], settings["ensemble_size"]
    torch.manual_seed(settings["seed"])
    weight_net = ConcatMlp(input_size=observation_dim + action_dim, output_size=1, hidden_sizes=[width] * layers)
    weight_net.last_fc.bias.data.fill_(settings["density"].get("last_bias", 1.0))
    qf1, qf2, target_qf1, target_qf2 = (example.ParallelMlp(observation_dim + action_dim, width, layers, 1, members)
                                        for _ in range(4))
    policies = [TanhGaussianPolicy(obs_dim=observation_dim, action_dim=action_dim, hidden_sizes=[width] * layers)
                for _ in range(members)]
    with torch.no_grad():
        policy_settings = settings["policy"]
        for policy in policies:
            if "mean_bias" in policy_settings:  # every member's mean head: kernel 0, this bias
                policy.last_fc.weight.zero_()
                policy.last_fc.bias.fill_(policy_settings["mean_bias"])
            if "log_std_bias" in policy_settings:  # log-std head: kernel 0, a bias below the clip
                policy.last_fc_log_std.weight.zero_()
                policy.last_fc_log_std.bias.fill_(policy_settings["log_std_bias"])
    policy = example.ParallelTanhGaussianPolicy(policies)
    target_qf1.load_state_dict(qf1.state_dict())
    target_qf2.load_state_dict(qf2.state_dict())
    return {"policy": policy, "qf1": qf1, "qf2": qf2, "target_qf1": target_qf1, "target_qf2": target_qf2,
            "weight_net": weight_net}


def make_trainer(settings: dict, networks: dict, action_dim: int, official):
    _, OursTrainer, _, _, _ = official
    env = types.SimpleNamespace(action_space=types.SimpleNamespace(shape=(action_dim,)))
    recorder = PriorityRecorder()
    trainer = OursTrainer(env=env, **networks, priority_replay_buffer=recorder, offline_dataset_size=0,
                          init_alpha=settings["init_alpha"], alpha_lr=settings["lr"], temperature=settings["temperature"],
                          discount=settings["discount"], reward_scale=1.0, policy_lr=settings["lr"],
                          qf_lr=settings["lr"], weight_net_lr=settings["lr"], soft_target_tau=settings["tau"],
                          target_update_period=1, use_automatic_entropy_tuning=True,
                          ensemble_size=settings["ensemble_size"])
    trainer.qf_criterion = TargetObserver(trainer.qf_criterion)
    return trainer, recorder


def parameters(trainer) -> dict:
    arrays = {f"{name}/{key.replace('.', '/')}": value.detach().numpy().copy()
              for name in NETWORKS for key, value in getattr(trainer, name).state_dict().items()}
    arrays["log_alpha"] = trainer.log_alpha.detach().numpy().copy()
    return arrays


def outputs(networks: dict, batch: dict, members: int) -> dict:
    import torch
    with torch.no_grad():
        obs, act = batch["rl_observations"], batch["rl_actions"]
        repeat = lambda x: x.unsqueeze(0).repeat(members, 1, 1)  # noqa: E731  (as compute_loss repeats)
        per_member = [policy(obs) for policy in networks["policy"].policies]
        mixture = networks["policy"](obs)
        w = lambda o, a: torch.relu(networks["weight_net"](o, a)).squeeze(-1)  # noqa: E731  (w_activation)
        return {"q1": networks["qf1"](repeat(obs), repeat(act)).squeeze(-1),
                "q2": networks["qf2"](repeat(obs), repeat(act)).squeeze(-1),
                "member_mean": torch.stack([d.normal_mean for d in per_member]),
                "member_log_std": torch.log(torch.stack([d.normal_std for d in per_member])),
                "policy_mean": mixture.normal_mean, "policy_std": mixture.normal_std,
                "w_offline": w(batch["offline_observations"], batch["offline_actions"]),
                "w_online": w(batch["online_observations"], batch["online_actions"]),
                "w_rl": w(obs, act)}


STATISTICS = {"QF1 Loss": "qf1_loss", "QF2 Loss": "qf2_loss", "Policy Loss": "policy_loss",
              "Weight Loss": "weight_loss", "Alpha": "alpha", "Alpha Loss": "alpha_loss", "Log Pis Mean": "log_pi"}


def one_update(settings: dict, initial: dict, batch: dict, action_dim: int, official, seed: int) -> tuple[dict, dict]:
    """A fresh trainer on copies of `initial`, one train_from_torch under torch seed `seed`."""
    import torch
    networks = copy.deepcopy(initial)
    trainer, recorder = make_trainer(settings, networks, action_dim, official)
    torch.manual_seed(seed)
    trainer.train_from_torch(batch)
    stats = trainer.eval_statistics
    info = {ours: np.asarray(stats[theirs], np.float64) for theirs, ours in STATISTICS.items()}
    targets = trainer.qf_criterion.targets
    info["q_target"] = targets[0].squeeze(-1).numpy()
    info["q_target_same_for_qf2"] = np.asarray(float(torch.equal(targets[0], targets[1])))
    (indices, priorities), = recorder.calls
    info["tree_idxs"], info["priorities"] = indices, priorities
    return info, {"trainer": trainer, "networks": networks}


def summaries(networks: dict, batch: dict, members: int) -> dict:
    """Scalars of the updated networks on the batch (for the draws over keys)."""
    out = outputs(networks, batch, members)
    return {"updated_member_mean": float(out["member_mean"].mean()),
            "updated_member_log_std": float(out["member_log_std"].mean()),
            "updated_policy_std": float(out["policy_std"].mean()),
            "updated_q": float(torch_mean(out["q1"], out["q2"]))}


def torch_mean(*tensors):
    return sum(float(t.mean()) for t in tensors) / len(tensors)


def run_case(settings: dict, batch: dict, official) -> dict:
    members, action_dim = settings["ensemble_size"], batch["rl_actions"].shape[-1]
    dims = (batch["rl_observations"].shape[-1], action_dim)
    initial = build_networks(settings, dims, official)
    trainer, _ = make_trainer(settings, copy.deepcopy(initial), action_dim, official)
    arrays = {f"init/{name}": value for name, value in parameters(trainer).items()}
    arrays.update({f"out/{name}": value.numpy() for name, value in outputs(initial, batch, members).items()})
    info, updated = one_update(settings, initial, batch, action_dim, official, settings["seed"])
    arrays.update({f"info/{name}": value for name, value in info.items()})
    arrays.update({f"updated/{name}": value for name, value in parameters(updated["trainer"]).items()})
    draws = []
    for index in range(settings["keys"]):
        info, updated = one_update(settings, initial, batch, action_dim, official, 1000 + index)
        scalars = {name: value for name, value in info.items() if np.ndim(value) == 0}
        scalars["q_target"] = float(info["q_target"].mean())
        scalars["log_alpha_updated"] = float(updated["trainer"].log_alpha.detach())
        scalars.update(summaries(updated["networks"], batch, members))
        draws.append(scalars)
    if draws:
        arrays.update({f"dist/{name}": np.asarray([draw[name] for draw in draws]) for name in draws[0]})
    return arrays


def main(argv=None) -> None:
    args = parse_args(argv)
    official = shims(args.source)
    import torch
    torch.set_num_threads(1)  # small matrices; one thread keeps the shared CPU's timings steady
    batch = {name: torch.as_tensor(value) for name, value in subtree(load(args.input), "batch").items()}
    arrays = {}
    for settings in json.loads(args.config):
        case = run_case(settings, batch, official)
        arrays.update({f"{settings['case']}/{name}": np.asarray(value) for name, value in case.items()})
    save(args.output, arrays)
    print(json.dumps({"written": len(arrays), "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
