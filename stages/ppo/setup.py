"""Setting up a PPO run: ``build(...) -> (PPOModels, PPOData)``. Where the policy comes from, the tokenizer
and chat format, the prompt / eval / PTX data, the actor and the frozen reference, the reward model, the
critic, dropout off, heads in fp32, and the optimisers (``stages.training``).

Models: the policy comes from the ``sft`` stage, the base model, or ``ppo.policy``; the reference is the
PEFT policy with its adapter disabled, or a frozen copy for full fine-tuning; the reward model is the
``rm`` stage's or ``ppo.reward_model``; the critic starts from the RM, the policy or a folder
(``ppo.critic_from``). Every function takes what it reads as arguments and returns what it builds.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from data.formats import DataError, load_examples
from pipeline.config import ChatConfig, RunConfig, model_location
from pipeline.models import chat_fingerprint, chat_format, load_model, load_tokenizer
from pipeline.stage import StageRun
from stages.chat import tokenize_sft
from stages.context import shared_base_model
from stages.engine import DistInfo, enable_activation_checkpointing
from stages.ppo.models import ModelSources, Optimisation, PPOModels
from stages.ppo.rewards import RewardSources
from stages.ppo.rollout import EncodedPrompt, encode_prompts
from stages.training import build_optimizer, disable_dropout, init_deepspeed, zero_stage_of
from stages.tuning import apply_tuning, load_trained, quantization_kwargs

if TYPE_CHECKING:
    from pipeline.config import PPOSizes


@dataclass
class PPOData:
    """The run's data: ``prompts`` (``ppo.data``, encoded), ``eval_prompts`` (``ppo.eval_data``; empty
    without), ``ptx_rows`` (tokenised SFT rows for the PTX loss; empty unless ``ppo.ptx_coef > 0``) and
    ``report`` (what was read from ``ppo.data``: counts, skipped rows)."""

    prompts: list[EncodedPrompt]
    eval_prompts: list[EncodedPrompt]
    ptx_rows: list[dict[str, Any]]
    report: Any


@dataclass
class PolicySource:
    """Where the policy starts: ``stage_dir`` (the SFT stage folder, or None), ``base_path`` (its base
    model folder), ``tokenizer_dir`` and a ``description`` for the manifest."""

    stage_dir: Path | None
    base_path: str | None
    tokenizer_dir: str
    description: str


@dataclass
class RewardModel:
    """The loaded reward model (``model``, unfrozen; None when nothing needs one), its own tokenizer when
    it has one (None: the rm stage's, which is the policy's), ``location``, ``read`` (where it is read:
    ``stages.scoring.reward_reading``), ``shares_format`` (same tokenizer and chat format as the policy, so
    its weights can start the critic) and ``max_length``."""

    model: Any | None
    tokenizer: Any | None
    location: str | None
    read: str | None
    shares_format: bool
    max_length: int


# ---------------------------------------------------------------------------------------- numerics
def _fp32_linear_forward(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        bias = None if self.bias is None else self.bias.float()
        return torch.nn.functional.linear(hidden.float(), self.weight.float(), bias)


def head_in_fp32(module: Any) -> None:
    """Make a plain ``nn.Linear`` head compute in fp32 whatever autocast or its weight dtype says:
    (..., in) -> (..., out) fp32. fp32 weights are used as they are; bf16 ones (DeepSpeed bf16 mode) are
    upcast per call. Other modules (a LoRA-wrapped head) are left alone. Bound as a method, so a
    ``deepcopy`` of the module (PEFT's modules_to_save) stays bound to its own copy."""
    if type(module) is torch.nn.Linear:
        module.forward = types.MethodType(_fp32_linear_forward, module)


def heads_in_fp32(actor: Any, reference: Any | None, critic: Any | None, reward_model: Any | None) -> None:
    """Log-probs, values and RM scores come out of their heads in fp32 (DESIGN §4): the lm_head of the
    actor and the reference, the critic's value head, the RM's score head. Under bf16 autocast a head
    rounds its output to bf16 (spacing 0.016 near a value of 2, more than a per-token KL reward)."""
    for model in (actor, reference):
        if model is not None:
            head_in_fp32(model.get_output_embeddings())
    for model in (critic, reward_model):
        if model is not None:
            for name, module in model.named_modules():  # PEFT keeps the head twice (modules_to_save)
                if {"score", "classifier"} & set(name.split(".")):
                    head_in_fp32(module)


# ------------------------------------------------------------------------------------------- build
def build(cfg: RunConfig, run: StageRun, dist: DistInfo, sizes: PPOSizes, bf16: bool,
          base_model: str | None = None) -> tuple[PPOModels, PPOData]:
    """Data, models and optimisers of a PPO run, and what the manifest records about them.

    ``base_model``: the base model folder (``prepare_base``) when the policy starts from the base model;
    prepared here (rank 0, then broadcast) when not given. New heads (a critic without an RM, LoRA) are
    initialised from the global RNG, which the caller seeds the same on every rank."""
    ppo = cfg.ppo
    policy = policy_source(cfg, run, dist, base_model)
    tokenizer = policy_tokenizer(cfg, run, policy)
    data = load_data(cfg, tokenizer)
    actor, reference, unfreezer = load_actor(cfg, policy, tokenizer, sizes, dist.device, bf16)
    rm = load_reward_model(cfg, run, dist, tokenizer)
    reward_model = frozen(rm.model, dist.device, bf16, bf16_weights=dist.device.type == "cuda") \
        if rm.model is not None else None
    critic, critic_from, critic_source = None, None, f"none ({ppo.advantage_estimator}: critic-free)"
    if ppo.uses_critic:  # critic-free estimators (grpo, rloo, reinforce_pp): no critic is built or loaded
        critic, critic_from, critic_source = load_critic(cfg, policy.base_path, tokenizer, rm)
        critic = disable_dropout(critic_trainable(cfg, critic)).to(dist.device).eval()
    rewards = RewardSources(ppo.rewards, cfg, tokenizer, reward_model, rm.max_length, dist.device,
                            autocast_bf16=bf16, batch_size=max(sizes.micro_batch, 8), rm_tokenizer=rm.tokenizer,
                            rm_read=rm.read or "trained_position")
    sources = ModelSources(policy.description, policy.base_path, critic_from, critic_source, rm.location, rm.read)
    run.update(policy_source=sources.policy_source, advantage_estimator=ppo.advantage_estimator,
               reference=reference_kind(cfg),
               critic_from=critic_from, critic_source=critic_source, rm_source=rm.location,
               rm_scoring=rewards.rm_scoring if reward_model is not None else None, reward_model_read=rm.read)
    heads_in_fp32(actor, reference, critic, reward_model)
    actor_optim, critic_optim, zero_stage = build_optimisers(cfg, actor, critic, unfreezer, sizes, dist, bf16)
    models = PPOModels(tokenizer=tokenizer, actor=actor, actor_optim=actor_optim, reference=reference,
                       adapter_reference=ppo.tuning.is_peft and ppo.uses_reference, critic=critic,
                       critic_optim=critic_optim,
                       reward_model=reward_model, rewards=rewards, unfreezer=unfreezer, zero_stage=zero_stage,
                       sources=sources, device=dist.device, bf16=bf16, temperature=ppo.temperature)
    return models, data


# ------------------------------------------------------------------------------------- policy, data
def policy_source(cfg: RunConfig, run: StageRun, dist: DistInfo, base_model: str | None) -> PolicySource:
    """The SFT stage (default), the base model, or a policy you bring (``ppo.policy``)."""
    ppo = cfg.ppo
    if ppo.policy_from == "sft":
        stage_dir = run.parent_dir("sft")
        if (stage_dir / "model").exists():
            base_path = str(stage_dir / "model")
        else:  # an adapter: its manifest names the base it was trained on
            base_path = json.loads((stage_dir / "manifest.json").read_text()).get("base_model")
        return PolicySource(stage_dir, base_path, str(stage_dir), f"sft stage ({stage_dir})")
    if ppo.policy_from == "path":
        base_path = model_location(ppo.policy.path)
        tokenizer_dir = model_location(ppo.policy.tokenizer) if ppo.policy.tokenizer else base_path
        return PolicySource(None, base_path, tokenizer_dir, base_path)
    base = base_model if base_model is not None else shared_base_model(cfg, dist)
    return PolicySource(None, base, base, f"base model ({base})")


def policy_tokenizer(cfg: RunConfig, run: StageRun, policy: PolicySource) -> Any:
    """The policy's tokenizer with the run's chat format (recorded in the manifest); pad must not be eos."""
    tokenizer = load_tokenizer(policy.tokenizer_dir, cfg.model, cfg.chat)
    fmt = chat_format(tokenizer, cfg.chat)
    run.set_chat_format(fmt, chat_fingerprint(fmt))
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("pad token equals eos: fix the tokenizer (model.pad_token) before PPO (DESIGN §3)")
    return tokenizer


def load_data(cfg: RunConfig, tokenizer: Any) -> PPOData:
    """Prompts (``ppo.data``), eval prompts (``ppo.eval_data``) and SFT rows for PTX."""
    ppo, system_prompt = cfg.ppo, cfg.chat.system_prompt
    if ppo.data is None:
        raise DataError("ppo.data is not set: point it at a prompt file "
                        "(JSONL with 'prompt', optional 'reference')")
    examples, report = load_examples(ppo.data, "prompt")
    prompts = encode_prompts(tokenizer, examples, ppo.max_prompt_length, system_prompt)
    eval_prompts = []
    if ppo.eval_data is not None:
        eval_examples, _ = load_examples(ppo.eval_data, "prompt")
        eval_prompts = encode_prompts(tokenizer, eval_examples, ppo.max_prompt_length, system_prompt)
    ptx_rows: list[dict[str, Any]] = []
    if ppo.ptx_coef > 0:
        source = ppo.ptx_data or cfg.sft.data
        if source is None:
            raise DataError("ppo.ptx_coef > 0 needs SFT data: set ppo.ptx_data (or sft.data)")
        sft_examples, _ = load_examples(source, "sft")
        max_len = ppo.max_prompt_length + ppo.max_new_tokens
        ptx_rows = [tokenize_sft(tokenizer, ex.messages, max_len, system_prompt) for ex in sft_examples]
    return PPOData(prompts, eval_prompts, ptx_rows, report)


# ---------------------------------------------------------------------------------- actor, reference
def load_actor(cfg: RunConfig, policy: PolicySource, tokenizer: Any, sizes: PPOSizes, device: torch.device,
               bf16: bool) -> tuple[Any, Any | None, Any | None]:
    """-> (actor: tuning applied, dropout off; reference: a frozen copy, None for PEFT where it is the
    adapter-disabled actor and when the run never reads the KL, ``ppo.uses_reference``; the gradual-unfreeze
    schedule or None)."""
    tuning = cfg.ppo.tuning
    qkw = quantization_kwargs(tuning)
    if policy.stage_dir is not None:
        actor = load_trained(policy.stage_dir, cfg.model, tokenizer, kind="causal_lm", **qkw)
        if hasattr(actor, "peft_config"):
            actor = actor.merge_and_unload()  # an SFT adapter becomes part of the PPO base
    else:
        actor = load_model(policy.base_path, cfg.model, tokenizer, **qkw)
    if tuning.is_peft and not tuning.is_lora_family and tuning.method != "ia3":
        raise ValueError(f"ppo.tuning.method={tuning.method!r}: PPO supports full, freeze, the LoRA family "
                         "and ia3 (the reference is the base with the adapter disabled)")
    reference = None
    if not tuning.is_peft and cfg.ppo.uses_reference:  # nothing reads the KL otherwise: no copy is loaded
        reference = load_trained(policy.stage_dir, cfg.model, tokenizer, kind="causal_lm") \
            if policy.stage_dir is not None else load_model(policy.base_path, cfg.model, tokenizer)
        if hasattr(reference, "peft_config"):
            reference = reference.merge_and_unload()
        # the reference computes exactly as the actor does (at step 0 its log-probs equal the actor's): the
        # actor's weight dtype, fp32 under autocast, bf16 only where DeepSpeed's bf16 mode casts the actor
        reference = frozen(reference, device, bf16, bf16_weights=bool(cfg.ppo.train.deepspeed))
    actor, unfreezer = apply_tuning(actor, tuning, "causal_lm", sizes.total_steps)
    if cfg.ppo.train.gradient_checkpointing:
        enable_activation_checkpointing(actor)
    actor.config.use_cache = True
    # dropout off (the ratio must be exactly 1 before the first update), also where gradient
    # checkpointing runs the update passes in train mode
    return disable_dropout(actor).to(device).eval(), reference, unfreezer


def reference_kind(cfg: RunConfig) -> str:
    """The manifest's ``reference``: what the KL is measured to."""
    if not cfg.ppo.uses_reference:
        return "none (ppo.kl_coef 0, no adaptive_kl or max_kl: the KL is not used)"
    return "the actor with its adapter disabled" if cfg.ppo.tuning.is_peft else "a frozen copy of the starting policy"


def frozen(model: Any, device: torch.device, bf16: bool, bf16_weights: bool) -> Any:
    """An inference-only copy on ``device``; its weights become bf16 when ``bf16`` and ``bf16_weights``
    (the reward model on CUDA, to halve its memory: its score head still runs in fp32, ``heads_in_fp32``)."""
    for param in model.parameters():
        param.requires_grad_(False)
    if bf16 and bf16_weights:
        model = model.to(torch.bfloat16)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------- reward model
def load_reward_model(cfg: RunConfig, run: StageRun, dist: DistInfo, tokenizer: Any) -> RewardModel:
    """The reward model, unfrozen (``model`` None when no kind 'rm' source and no ``critic_from: rm`` needs
    one): ``ppo.reward_model`` (any AutoModelForSequenceClassification with one label, with its tokenizer and
    chat template) when set, else the ``rm`` stage's model (same tokenizer: the stage fingerprints match, so
    its tokenizer is not loaded again)."""
    from stages.scoring import READ_TRAINED, load_transformers_reward_model, reward_reading

    ppo = cfg.ppo
    if not (any(r.kind == "rm" for r in ppo.rewards) or ppo.critic_from == "rm"):
        return RewardModel(None, None, None, None, False, cfg.rm.max_length)
    if ppo.reward_model is None:
        from stages.scoring import load_reward_model as load_stage_reward_model

        rm_dir = run.parent_dir("rm")
        rm, _ = load_stage_reward_model(rm_dir, cfg.model)
        return RewardModel(rm, None, str(rm_dir), READ_TRAINED, True, cfg.rm.max_length)
    source = ppo.reward_model
    location = model_location(source.path)
    reading = reward_reading(location)
    if reading.stage_dir is not None:
        raise ValueError(f"ppo.reward_model.path={source.path!r} is an rm stage folder: give its model/ "
                         f"subfolder ({reading.stage_dir / 'model'}), or add rm to the run's stages")
    from transformers import AutoConfig

    labels = AutoConfig.from_pretrained(location, trust_remote_code=cfg.model.trust_remote_code).num_labels
    if labels != 1:
        raise ValueError(f"ppo.reward_model.path={source.path!r} has num_labels={labels}: a reward model is an "
                         "AutoModelForSequenceClassification with one label (one scalar score per sequence)")
    chat = ChatConfig(template=source.chat_template, system_prompt=cfg.chat.system_prompt)
    tokenizer_location = model_location(source.tokenizer) if source.tokenizer else location
    rm_tokenizer = load_tokenizer(tokenizer_location, cfg.model, chat,
                                  template_key="ppo.reward_model.chat_template", foreign=True)
    from stages.ppo.rewards import same_chat_format

    shares_format = same_chat_format(tokenizer, rm_tokenizer, cfg)
    max_length = source.max_length or reading.max_length or cfg.rm.max_length
    if dist.is_main:
        print(f"[alignpipe] ppo: reward model {location} read at {reading.read} ({reading.why})", flush=True)
    if reading.read == READ_TRAINED:
        rm_model_cfg = cfg.model.model_copy(update={"pad_token": rm_tokenizer.pad_token})
        rm = load_model(location, rm_model_cfg, rm_tokenizer, kind="seq_cls").eval()
        return RewardModel(rm, rm_tokenizer, location, reading.read, shares_format, max_length)
    # trained elsewhere: model and tokenizer as saved (its own pad id), so its forward pools where transformers'
    # does; rm_tokenizer (pad fixed like the policy's) only decided shares_format
    rm, reading_tokenizer = load_transformers_reward_model(location, cfg.model, tokenizer_location,
                                                           source.chat_template)
    return RewardModel(rm, reading_tokenizer, location, reading.read, shares_format, max_length)


# ------------------------------------------------------------------------------------------- critic
def load_critic(cfg: RunConfig, base_path: str | None, tokenizer: Any, rm: RewardModel) -> tuple[Any, str, str]:
    """-> (the critic: token-level value model, ``critic_from``, ``critic_source``) by ``ppo.critic_from``.

    ``rm``: the reward model's weights with its score head as the value head (needs an RM with the
    policy's tokenizer and chat format); ``policy``: the policy's weights with a new value head;
    a folder / hub name: that model (same tokenizer as the policy). ``auto``: ``rm`` when the run has
    an RM that shares the policy's tokenizer, else ``policy``. Value-head biases start at 0.
    """
    rm_shares = rm.model is not None and rm.shares_format
    choice = cfg.ppo.critic_from
    if choice == "auto":
        choice = "rm" if rm_shares else "policy"
    if choice == "policy":
        return (load_model(base_path, cfg.model, tokenizer, kind="token_cls"), "policy",
                f"{base_path} (the policy, new value head)")
    if choice == "rm":
        if not rm_shares:
            raise ValueError(f"ppo.critic_from='rm' needs a reward model with the policy's tokenizer and chat "
                             f"format, but the one at {rm.location} has another (it scores text in its own "
                             "template). Use ppo.critic_from: policy (or a folder with the policy's tokenizer)")
        if rm.tokenizer is None:  # the rm stage: model/ or base + adapter
            critic = load_trained(Path(rm.location), cfg.model, tokenizer, kind="token_cls")
            critic = critic.merge_and_unload() if hasattr(critic, "peft_config") else critic
        else:
            critic = load_model(rm.location, cfg.model, tokenizer, kind="token_cls")
        check_critic_head(critic, rm.model)
        critic_from, critic_source = "rm", rm.location
    else:
        location = model_location(choice)
        check_same_tokenizer(cfg, location, tokenizer)
        critic = load_model(location, cfg.model, tokenizer, kind="token_cls")
        critic_from, critic_source = "path", location
    with torch.no_grad():  # an RM head has no bias; the token head's new bias starts at 0
        for name, param in critic.named_parameters():
            if name.endswith("score.bias"):
                param.zero_()
    return critic, critic_from, critic_source


def critic_trainable(cfg: RunConfig, critic: Any) -> Any:
    """LoRA on the critic when the actor uses the LoRA family (the value head trains in full), else all of it."""
    ppo = cfg.ppo
    if ppo.tuning.is_lora_family:
        import peft

        critic = peft.get_peft_model(critic, peft.LoraConfig(
            task_type=peft.TaskType.TOKEN_CLS, r=ppo.tuning.lora_r, lora_alpha=ppo.tuning.lora_alpha,
            lora_dropout=ppo.tuning.lora_dropout, target_modules=ppo.tuning.target_modules,
            exclude_modules=["score", "classifier"]))  # the value head trains in full (modules_to_save)
        for name, param in critic.named_parameters():
            if "score" in name or "classifier" in name:
                param.requires_grad_(True)
    else:
        for param in critic.parameters():
            param.requires_grad_(True)
    if ppo.train.gradient_checkpointing:
        enable_activation_checkpointing(critic)
    return critic


def check_same_tokenizer(cfg: RunConfig, location: str, tokenizer: Any) -> None:
    """A critic from a folder / hub name must read the policy's token ids (same vocabulary and eos)."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"ppo.critic_from={cfg.ppo.critic_from!r}: cannot load its tokenizer ({exc}); "
                         "the critic must come with the policy's tokenizer") from exc
    ours = {t: i for t, i in tokenizer.get_vocab().items() if t != tokenizer.pad_token}
    mine = {t: i for t, i in theirs.get_vocab().items() if t != theirs.pad_token}
    if ours != mine or theirs.eos_token_id != tokenizer.eos_token_id:
        raise ValueError(f"ppo.critic_from={cfg.ppo.critic_from!r}: its tokenizer differs from the policy's "
                         "(vocabulary or eos); the critic reads the policy's token ids. Use ppo.critic_from: "
                         "policy, or rm with a reward model that shares the policy's tokenizer")


def check_critic_head(critic: Any, rm: Any) -> None:
    """The critic's value head must start as the RM's score head (token-level value on the RM)."""
    def head(model: Any) -> torch.Tensor | None:
        for name, param in model.named_parameters():
            if name.endswith("score.weight"):
                return param.detach().float().cpu()
        return None

    a, b = head(critic), head(rm)
    if a is None or b is None or a.shape != b.shape or not torch.allclose(a, b):
        raise RuntimeError("the critic's value head was not initialised from the RM's score head (weights "
                           "differ or are missing); the RM checkpoint must hold a 'score' head")


# --------------------------------------------------------------------------------------- optimisers
def build_optimisers(cfg: RunConfig, actor: Any, critic: Any | None, unfreezer: Any | None, sizes: PPOSizes,
                     dist: DistInfo, bf16: bool) -> tuple[Optimisation, Optimisation | None, int]:
    """-> (the actor's, the critic's (None without a critic), the ZeRO stage: 0 without DeepSpeed). AdamW +
    schedule per model (``stages.training``); DeepSpeed engines when ``ppo.train.deepspeed``."""
    train = cfg.ppo.train
    actor_params = [q for q in actor.parameters() if q.requires_grad or unfreezer is not None]
    critic_params = [q for q in critic.parameters() if q.requires_grad] if critic is not None else None
    if not actor_params or critic_params == []:
        raise ValueError("no trainable parameters in the actor or critic: check ppo.tuning")
    # fused AdamW (one kernel for all tensors; CPU and CUDA) unless DeepSpeed manages the step, then
    # foreach (the CPU default would loop over tensors in Python)
    fast = {"foreach": True} if train.deepspeed else {"fused": True}
    critic_lr = train.critic_learning_rate or train.learning_rate
    # the actor steps only after the critic warm-up, so its schedule spans only those steps
    warmup_steps = min(cfg.ppo.critic_warmup_steps, sizes.total_steps) * cfg.ppo.ppo_epochs
    actor_steps = max(1, sizes.optimizer_steps - warmup_steps * sizes.n_minibatches)
    actor_optim = Optimisation(actor_params, *build_optimizer(actor_params, train.learning_rate, train.weight_decay,
                                                              train.lr_scheduler, 0, actor_steps, **fast))
    critic_optim = None
    if critic is not None:
        critic_optim = Optimisation(critic_params, *build_optimizer(critic_params, critic_lr, train.weight_decay,
                                                                    train.lr_scheduler, 0, sizes.optimizer_steps,
                                                                    **fast))
    if not train.deepspeed:
        return actor_optim, critic_optim, 0
    ds_kwargs = dict(micro_batch=sizes.micro_batch, grad_accum=sizes.grad_accum, world_size=dist.world_size,
                     weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm, bf16=bf16)
    ds_config = _to_deepspeed(actor, actor_optim, train.deepspeed, train.learning_rate, ds_kwargs)
    if critic is not None:
        _to_deepspeed(critic, critic_optim, train.deepspeed, critic_lr, ds_kwargs)
    return actor_optim, critic_optim, zero_stage_of(ds_config)


def _to_deepspeed(model: Any, optim: Optimisation, ds_path: str, lr: float, ds_kwargs: dict[str, Any]) -> dict:
    """Wrap ``model`` in a DeepSpeed engine (``optim`` takes the engine's optimiser and schedule); -> the
    filled DeepSpeed config."""
    optim.engine, optim.optimizer, optim.scheduler, ds_config = init_deepspeed(
        model, optim.optimizer, optim.scheduler, ds_path, lr=lr,
        hidden_size=getattr(model.config, "hidden_size", None), **ds_kwargs)
    optim.engine.module.eval()
    return ds_config
