"""Setting up a PPO run (``PPOSetup``, a part of ``PPOTrainer``): where the policy comes from, the
tokenizer and chat format, the prompt / eval / PTX data, the actor and the frozen reference, the reward
model, the critic, dropout off, heads in fp32, and the optimisers (``stages.training``).

Models: the policy comes from the ``sft`` stage, the base model, or ``ppo.policy``; the reference is the
LoRA policy with its adapter disabled, or a frozen copy for full fine-tuning; the reward model is the
``rm`` stage's or ``ppo.reward_model``; the critic starts from the RM, the policy or a folder
(``ppo.critic_from``).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch

from data.formats import DataError, load_examples
from pipeline.config import ChatConfig, model_location
from pipeline.models import chat_fingerprint, chat_format, load_model, load_tokenizer, prepare_base
from stages.chat import tokenize_sft
from stages.engine import enable_activation_checkpointing
from stages.ppo.rewards import RewardSources
from stages.ppo.rollout import encode_prompts
from stages.training import build_optimizer, disable_dropout, init_deepspeed, zero_stage_of
from stages.tuning import apply_tuning, load_trained, quantization_kwargs


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


# ------------------------------------------------------------------------------------------- set-up
class PPOSetup:
    """Loads the data and models and builds the optimisers; mixed into ``PPOTrainer`` (uses its ``cfg``,
    ``run``, ``dist``, ``device``, ``bf16``, ``sizes``)."""

    def _load_data_and_models(self) -> None:
        policy_dir = self._policy_source()
        tokenizer = self.tokenizer
        self._load_prompts(tokenizer)
        self._load_actor(policy_dir, tokenizer)
        # reward model (the rm stage's or one you bring) and critic (ppo.critic_from)
        rm, rm_tokenizer, rm_location = self._load_reward_model(tokenizer)
        self.rm = self._frozen(rm) if rm is not None else None
        if self.cfg.ppo.uses_critic:
            critic = self._load_critic(tokenizer, rm, rm_tokenizer, rm_location)
            self.critic = disable_dropout(self._critic_trainable(critic)).to(self.device).eval()
        else:  # critic-free estimators (grpo, rloo, reinforce_pp): no critic is built or loaded
            self.critic, self.critic_from = None, None
            self.critic_source = f"none ({self.cfg.ppo.advantage_estimator}: critic-free)"
        self.rewards = RewardSources(self.cfg.ppo.rewards, self.cfg, tokenizer, self.rm, self.rm_max_length,
                                     self.device, autocast_bf16=self.bf16,
                                     batch_size=max(self.sizes.micro_batch, 8), rm_tokenizer=rm_tokenizer,
                                     rm_read=self.rm_read or "trained_position")
        self.run.update(policy_source=self.policy_source, advantage_estimator=self.cfg.ppo.advantage_estimator,
                        critic_from=self.critic_from,
                        critic_source=self.critic_source, rm_source=rm_location,
                        rm_scoring=self.rewards.rm_scoring if self.rm is not None else None,
                        reward_model_read=self.rm_read)

    def _policy_source(self) -> Path | None:
        """The SFT stage (default), the base model, or a policy you bring (``ppo.policy``): sets
        ``base_path``, ``policy_source`` and ``tokenizer``; returns the SFT stage folder or None."""
        cfg, ppo, dist = self.cfg, self.cfg.ppo, self.dist
        if ppo.policy_from == "sft":
            policy_dir = self.run.parent_dir("sft")
            self.base_path = str(policy_dir / "model") if (policy_dir / "model").exists() else None
            tok_dir = str(policy_dir)
            self.policy_source = f"sft stage ({policy_dir})"
        elif ppo.policy_from == "path":
            policy_dir, self.base_path = None, model_location(ppo.policy.path)
            tok_dir = model_location(ppo.policy.tokenizer) if ppo.policy.tokenizer else self.base_path
            self.policy_source = self.base_path
        else:
            base = prepare_base(cfg.model) if dist.is_main else None
            if dist.world_size > 1:
                holder = [base]
                torch.distributed.broadcast_object_list(holder, src=0)
                base = holder[0]
            policy_dir, self.base_path, tok_dir = None, base, base
            self.policy_source = f"base model ({base})"
        tokenizer = load_tokenizer(tok_dir, cfg.model, cfg.chat)
        fmt = chat_format(tokenizer, cfg.chat)
        self.run.set_chat_format(fmt, chat_fingerprint(fmt))
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("pad token equals eos: fix the tokenizer (model.pad_token) before PPO (DESIGN §3)")
        return policy_dir

    def _load_prompts(self, tokenizer: Any) -> None:
        """``prompts`` (ppo.data), ``eval_prompts`` (ppo.eval_data) and ``ptx_rows`` (SFT rows for PTX)."""
        cfg, ppo = self.cfg, self.cfg.ppo
        if ppo.data is None:
            raise DataError("ppo.data is not set: point it at a prompt file "
                            "(JSONL with 'prompt', optional 'reference')")
        examples, self.data_report = load_examples(ppo.data, "prompt")
        self.prompts = encode_prompts(tokenizer, examples, ppo.max_prompt_length, cfg.chat.system_prompt)
        self.eval_prompts = []
        if ppo.eval_data is not None:
            eval_examples, _ = load_examples(ppo.eval_data, "prompt")
            self.eval_prompts = encode_prompts(tokenizer, eval_examples, ppo.max_prompt_length, cfg.chat.system_prompt)
        self.ptx_rows: list[dict[str, Any]] = []
        if ppo.ptx_coef > 0:
            source = ppo.ptx_data or cfg.sft.data
            if source is None:
                raise DataError("ppo.ptx_coef > 0 needs SFT data: set ppo.ptx_data (or sft.data)")
            sft_examples, _ = load_examples(source, "sft")
            max_len = ppo.max_prompt_length + ppo.max_new_tokens
            self.ptx_rows = [tokenize_sft(tokenizer, ex.messages, max_len, cfg.chat.system_prompt)
                             for ex in sft_examples]

    def _load_actor(self, policy_dir: Path | None, tokenizer: Any) -> None:
        """``actor`` (tuning applied, dropout off) and ``ref`` (None for PEFT: the adapter-disabled actor)."""
        cfg, tuning = self.cfg, self.cfg.ppo.tuning
        qkw = quantization_kwargs(tuning)
        if policy_dir is not None:
            actor = load_trained(policy_dir, cfg.model, tokenizer, kind="causal_lm", **qkw)
            if hasattr(actor, "peft_config"):
                actor = actor.merge_and_unload()  # an SFT adapter becomes part of the PPO base
            if self.base_path is None:
                self.base_path = json.loads((policy_dir / "manifest.json").read_text()).get("base_model")
        else:
            actor = load_model(self.base_path, cfg.model, tokenizer, **qkw)
        self.lora = tuning.is_peft
        if tuning.is_peft and not tuning.is_lora_family and tuning.method != "ia3":
            raise ValueError(f"ppo.tuning.method={tuning.method!r}: PPO supports full, freeze, the LoRA family "
                             "and ia3 (the reference is the base with the adapter disabled)")
        self.ref = None
        if not self.lora:
            ref = load_trained(policy_dir, cfg.model, tokenizer, kind="causal_lm") if policy_dir is not None \
                else load_model(self.base_path, cfg.model, tokenizer)
            if hasattr(ref, "peft_config"):
                ref = ref.merge_and_unload()
            self.ref = self._frozen(ref, reference=True)
        actor, self.unfreezer = apply_tuning(actor, tuning, "causal_lm", self.sizes.total_steps)
        if self.cfg.ppo.train.gradient_checkpointing:
            enable_activation_checkpointing(actor)
        actor.config.use_cache = True
        # dropout off (the ratio must be exactly 1 before the first update), also where gradient
        # checkpointing runs the update passes in train mode
        self.actor = disable_dropout(actor).to(self.device).eval()

    def _critic_trainable(self, critic: Any) -> Any:
        """LoRA on the critic when the actor uses the LoRA family (the value head trains in full), else all of it."""
        ppo = self.cfg.ppo
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

    def _load_reward_model(self, tokenizer: Any) -> tuple[Any | None, Any | None, str | None]:
        """-> (reward model, its own tokenizer or None, where it was loaded from), unfrozen; (None, None,
        None) when no kind 'rm' source and no ``critic_from: rm`` needs one.

        ``ppo.reward_model`` (any AutoModelForSequenceClassification with one label, with its tokenizer and
        chat template) when set, else the ``rm`` stage's model (same tokenizer: the stage fingerprints
        match, so its tokenizer is not loaded again). Sets ``rm_max_length``, ``rm_read`` (where it is
        read: ``stages.scoring.reward_reading``; None without an RM) and ``rm_shares_format`` (same
        tokenizer and chat format as the policy, so its weights can start the critic).
        """
        from stages.scoring import READ_TRAINED, load_transformers_reward_model, reward_reading

        cfg, ppo = self.cfg, self.cfg.ppo
        self.rm_max_length = cfg.rm.max_length
        self.rm_read, self.rm_shares_format = None, False
        if not (any(r.kind == "rm" for r in ppo.rewards) or ppo.critic_from == "rm"):
            return None, None, None
        if ppo.reward_model is None:
            from stages.scoring import load_reward_model

            rm_dir = self.run.parent_dir("rm")
            rm, _ = load_reward_model(rm_dir, cfg.model)
            self.rm_read, self.rm_shares_format = READ_TRAINED, True
            return rm, None, str(rm_dir)
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

        self.rm_read, self.rm_shares_format = reading.read, same_chat_format(tokenizer, rm_tokenizer, cfg)
        self.rm_max_length = source.max_length or reading.max_length or cfg.rm.max_length
        if self.dist.is_main:
            print(f"[alignpipe] ppo: reward model {location} read at {reading.read} ({reading.why})", flush=True)
        if reading.read == READ_TRAINED:
            rm_model_cfg = cfg.model.model_copy(update={"pad_token": rm_tokenizer.pad_token})
            rm = load_model(location, rm_model_cfg, rm_tokenizer, kind="seq_cls").eval()
            return rm, rm_tokenizer, location
        # trained elsewhere: model and tokenizer as saved (its own pad id), so its forward pools where transformers'
        # does; rm_tokenizer (pad fixed like the policy's) only decided rm_shares_format
        rm, reading_tokenizer = load_transformers_reward_model(location, cfg.model, tokenizer_location,
                                                               source.chat_template)
        return rm, reading_tokenizer, location

    def _load_critic(self, tokenizer: Any, rm: Any | None, rm_tokenizer: Any | None, rm_location: str | None) -> Any:
        """The critic (token-level value model) by ``ppo.critic_from``; sets ``critic_from`` / ``critic_source``.

        ``rm``: the reward model's weights with its score head as the value head (needs an RM with the
        policy's tokenizer and chat format); ``policy``: the policy's weights with a new value head;
        a folder / hub name: that model (same tokenizer as the policy). ``auto``: ``rm`` when the run has
        an RM that shares the policy's tokenizer, else ``policy``. Value-head biases start at 0.
        """
        cfg, ppo = self.cfg, self.cfg.ppo
        rm_shares = rm is not None and self.rm_shares_format
        choice = ppo.critic_from
        if choice == "auto":
            choice = "rm" if rm_shares else "policy"
        if choice == "policy":
            self.critic_from, self.critic_source = "policy", f"{self.base_path} (the policy, new value head)"
            return load_model(self.base_path, cfg.model, tokenizer, kind="token_cls")
        if choice == "rm":
            if not rm_shares:
                raise ValueError(f"ppo.critic_from='rm' needs a reward model with the policy's tokenizer and chat "
                                 f"format, but the one at {rm_location} has another (it scores text in its own "
                                 "template). Use ppo.critic_from: policy (or a folder with the policy's tokenizer)")
            if rm_tokenizer is None:  # the rm stage: model/ or base + adapter
                critic = load_trained(Path(rm_location), cfg.model, tokenizer, kind="token_cls")
                critic = critic.merge_and_unload() if hasattr(critic, "peft_config") else critic
            else:
                critic = load_model(rm_location, cfg.model, tokenizer, kind="token_cls")
            self._check_critic_head(critic, rm)
            self.critic_from, self.critic_source = "rm", rm_location
        else:
            location = model_location(choice)
            self._check_same_tokenizer(location, tokenizer)
            critic = load_model(location, cfg.model, tokenizer, kind="token_cls")
            self.critic_from, self.critic_source = "path", location
        with torch.no_grad():  # an RM head has no bias; the token head's new bias starts at 0
            for name, param in critic.named_parameters():
                if name.endswith("score.bias"):
                    param.zero_()
        return critic

    def _check_same_tokenizer(self, location: str, tokenizer: Any) -> None:
        """A critic from a folder / hub name must read the policy's token ids (same vocabulary and eos)."""
        from transformers import AutoTokenizer

        try:
            theirs = AutoTokenizer.from_pretrained(location, trust_remote_code=self.cfg.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ValueError(f"ppo.critic_from={self.cfg.ppo.critic_from!r}: cannot load its tokenizer ({exc}); "
                             "the critic must come with the policy's tokenizer") from exc
        ours = {t: i for t, i in tokenizer.get_vocab().items() if t != tokenizer.pad_token}
        mine = {t: i for t, i in theirs.get_vocab().items() if t != theirs.pad_token}
        if ours != mine or theirs.eos_token_id != tokenizer.eos_token_id:
            raise ValueError(f"ppo.critic_from={self.cfg.ppo.critic_from!r}: its tokenizer differs from the policy's "
                             "(vocabulary or eos); the critic reads the policy's token ids. Use ppo.critic_from: "
                             "policy, or rm with a reward model that shares the policy's tokenizer")

    def _frozen(self, model: Any, reference: bool = False) -> Any:
        """An inference-only copy on the device. The reference computes exactly as the actor does (at
        step 0 its log-probs equal the actor's): it keeps the actor's weight dtype, fp32 under autocast,
        bf16 only where DeepSpeed's bf16 mode casts the actor. The reward model may hold bf16 weights
        on CUDA to halve its memory; its score head still runs in fp32 (:meth:`_heads_in_fp32`)."""
        for param in model.parameters():
            param.requires_grad_(False)
        bf16_weights = bool(self.cfg.ppo.train.deepspeed) if reference else self.device.type == "cuda"
        if self.bf16 and bf16_weights:
            model = model.to(torch.bfloat16)
        return model.to(self.device).eval()

    def _heads_in_fp32(self) -> None:
        """Log-probs, values and RM scores come out of their heads in fp32 (DESIGN §4): the lm_head of the
        actor and the reference, the critic's value head, the RM's score head. Under bf16 autocast a head
        rounds its output to bf16 (spacing 0.016 near a value of 2, more than a per-token KL reward)."""
        for model in (self.actor, self.ref):
            if model is not None:
                head_in_fp32(model.get_output_embeddings())
        for model in (self.critic, self.rm):
            if model is not None:
                for name, module in model.named_modules():  # PEFT keeps the head twice (modules_to_save)
                    if {"score", "classifier"} & set(name.split(".")):
                        head_in_fp32(module)

    @staticmethod
    def _check_critic_head(critic: Any, rm: Any) -> None:
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

    def _build_optimisers(self) -> None:
        """AdamW + schedule per model (``stages.training``); DeepSpeed engines when ``ppo.train.deepspeed``."""
        train, sizes = self.cfg.ppo.train, self.sizes
        actor_params = [q for q in self.actor.parameters() if q.requires_grad or self.unfreezer is not None]
        critic_params = [q for q in self.critic.parameters() if q.requires_grad] if self.critic is not None else None
        if not actor_params or critic_params == []:
            raise ValueError("no trainable parameters in the actor or critic: check ppo.tuning")
        # fused AdamW (one kernel for all tensors; CPU and CUDA) unless DeepSpeed manages the step, then
        # foreach (the CPU default would loop over tensors in Python)
        fast = {"foreach": True} if train.deepspeed else {"fused": True}
        self.actor_params, self.critic_params = actor_params, critic_params
        critic_lr = train.critic_learning_rate or train.learning_rate
        # the actor steps only after the critic warm-up, so its schedule spans only those steps
        warmup_steps = min(self.cfg.ppo.critic_warmup_steps, sizes.total_steps) * self.cfg.ppo.ppo_epochs
        actor_steps = max(1, sizes.optimizer_steps - warmup_steps * sizes.n_minibatches)
        self.actor_opt, self.actor_sched = build_optimizer(actor_params, train.learning_rate, train.weight_decay,
                                                           train.lr_scheduler, 0, actor_steps, **fast)
        self.critic_opt = self.critic_sched = None
        if self.critic is not None:
            self.critic_opt, self.critic_sched = build_optimizer(critic_params, critic_lr, train.weight_decay,
                                                                 train.lr_scheduler, 0, sizes.optimizer_steps, **fast)
        self.actor_engine = self.critic_engine = None
        self.zero_stage = 0
        if not train.deepspeed:
            return
        ds_kwargs = dict(micro_batch=sizes.micro_batch, grad_accum=sizes.grad_accum, world_size=self.dist.world_size,
                         weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm, bf16=self.bf16)
        self.actor_engine, self.actor_opt, self.actor_sched, ds_config = init_deepspeed(
            self.actor, self.actor_opt, self.actor_sched, train.deepspeed, lr=train.learning_rate,
            hidden_size=getattr(self.actor.config, "hidden_size", None), **ds_kwargs)
        self.actor_engine.module.eval()
        if self.critic is not None:
            self.critic_engine, self.critic_opt, self.critic_sched, _ = init_deepspeed(
                self.critic, self.critic_opt, self.critic_sched, train.deepspeed, lr=critic_lr,
                hidden_size=getattr(self.critic.config, "hidden_size", None), **ds_kwargs)
            self.critic_engine.module.eval()
        self.zero_stage = zero_stage_of(ds_config)
