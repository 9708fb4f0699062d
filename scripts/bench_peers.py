"""Peer benchmark: mlxpost against TRL, mlx-lm's LoRA trainer and mlx-lm-lora, on the same work.

One invocation measures every selected (task, model, tool) and writes a markdown report
(default docs/bench_peers.md; ``--json FILE`` for the raw figures). Tools are compared within
their framework: mlxpost's torch backend against TRL (PyTorch), mlxpost's MLX backend against
mlx-lm (``mlx_lm.tuner.trainer.train``, what ``mlx_lm.lora`` runs) and mlx-lm-lora (MLX).

How every measurement is taken (the same for all tools)
------------------------------------------------------
* Each (task, model, tool) runs in its own Python subprocess (this script with ``--worker``),
  so imports, allocator state and peak memory never leak between tools. The subprocess
  loads the tokenizer and model, attaches LoRA, builds the tool's trainer and runs
  ``warmup + steps`` optimizer steps through the tool's own training loop; only the last
  ``steps`` are timed. ``--repeat N`` runs the whole list N times round-robin and pools the
  timed steps, which evens out a machine whose load changes.
* A step's time is read in-process with ``time.perf_counter``:
  mlxpost: around ``Backend.train_step`` (SFT) or the algorithm's ``train_step(step)``
  (GRPO, DPO: sampling, rewards, the optimizer step); TRL: a ``TrainerCallback`` from
  ``on_step_begin`` to ``on_step_end`` (the whole ``training_step`` and optimizer step;
  for GRPO generation and scoring happen inside it); mlx-lm and mlx-lm-lora: their own
  per-step timer, reported through a ``TrainingCallback`` with ``steps_per_report=1``
  (from after the batch is drawn until ``mx.eval`` of the updated state). Throughput is
  units done in the timed steps / the sum of their seconds; ``s/step`` is the median. The
  process's CPU time (all threads) is read at the same boundaries: 'CPU/wall' near the
  thread count means the step had the CPUs; far below it, it waited for them.
* Memory: the subprocess's peak resident set (imports, tokenizer, model, data and training
  together): ``VmHWM`` from /proc/self/status on Linux, else
  ``getrusage(RUSAGE_SELF).ru_maxrss``. (On Linux ru_maxrss is carried over fork + exec, so
  a worker's can be its parent's size; it is kept in ``--json`` as ``ru_maxrss_mib``, and
  the models and data are built in a subprocess so the parent stays small.) Plus the
  framework allocator's peak where one exists (``mx.get_peak_memory()`` for MLX;
  ``torch.cuda.max_memory_allocated()`` on CUDA; torch on CPU keeps none: n/a).
* Common settings: float32 weights and compute everywhere (TRL's bf16 default and its
  gradient-checkpointing default are switched off, as mlxpost does neither), LoRA rank 8,
  alpha 16 (mlx-lm: scale 2.0 = alpha/rank), dropout 0, on every GPT-2 attention and MLP
  projection (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), AdamW lr 1e-4, weight decay 0;
  the model's own dropout off (mlxpost runs the model in eval mode; TRL gets a model loaded
  with attn/embd/resid dropout 0; mlx-lm's GPT-2 has none). Gradient clipping at norm 1.0
  is on in mlxpost and TRL (their defaults); mlx-lm and mlx-lm-lora do not clip.

The work
--------
* SFT (LoRA): the bundled math data (``math/train.jsonl``) rendered with the chat template,
  concatenated into one token stream and cut into rows of exactly ``seq_len`` tokens, so no
  row has padding; step s trains on rows [s*B, (s+1)*B). Counted tokens = B * seq_len per
  step: every input token the model processes (none is padding). mlxpost gets the rows as
  (input_ids, attention_mask of ones, loss on every predicted token) with the loss SFT trains
  with (``nll_and_kl_loss``, kl_beta 0); TRL ``SFTTrainer`` gets them as a pre-tokenised
  ``input_ids`` dataset (``packing=False``, ``max_length=seq_len``: nothing to pack, cut or
  pad); mlx-lm gets the same rows as its (tokens, offset) dataset and batches them with its
  own ``iterate_batches`` (with seq_len a multiple of 32 its padding rule adds no input
  column, so its forward pass also sees B x seq_len real tokens).
* GRPO (LoRA): prompts from the bundled ``rl/prompts.jsonl`` rendered with the chat template,
  keeping only those of the most common token length, so every tool's prompts are the same
  length whatever order it draws them in. Each step: ``prompts`` prompts x ``generations``
  samples, exactly ``new_tokens`` new tokens each (EOS-free): mlxpost samples with an EOS id
  that never occurs; TRL gets ``generation_kwargs={"min_new_tokens": new_tokens}`` (EOS
  suppressed until the limit); mlx-lm-lora gets a tokenizer with no EOS ids and no end-answer
  token. Temperature 1.0, no top-k/top-p, KL weight 0 and no reference forward in any
  tool (mlxpost runs with ``log_kl=False``, i.e. ``--no-log-kl``; by default it logs the KL),
  one policy update per batch, per-sequence mean aggregation ("grpo"), group-std
  advantages, and a cheap reward (``plan.bench_reward``: share of distinct words). Reported:
  s/step, completion tokens per step (counted from what each sampler returned), and
  sampling tokens/s = completion tokens / seconds inside the tool's sampling call (mlxpost
  ``Rollouts.sample``; TRL ``_generate_single_turn``; mlx-lm-lora ``generate_grpo``),
  prompt prefill included. TRL prefills every sample separately (it repeats each prompt
  ``generations`` times); mlxpost and mlx-lm-lora share one prefill per prompt.
* DPO (LoRA, sigmoid loss, beta 0.1): pairs from the bundled ``preferences/train.jsonl`` as
  conversations whose prompt + chosen and prompt + rejected both render to more than
  ``length`` tokens; every tool truncates them to ``length`` tokens (mlxpost
  ``--on-too-long truncate``; TRL ``max_length``; mlx-lm-lora ``max_seq_length``), so each
  step processes 2 x pairs rows of exactly ``length`` tokens. Reference: torch tools
  precompute the reference logprobs before training (mlxpost's default; TRL
  ``precompute_ref_log_probs=True``), untimed; mlx-lm-lora only has a live reference (a
  second copy of the model run in every step), so mlxpost's MLX backend runs
  ``--reference-mode live`` against it. Reported: pairs/s. mlx-lm-lora's ``train_dpo``
  calls ``mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])``, a
  key MLX reports only on Metal (KeyError on the CPU and CUDA builds); the worker adds the
  key (the machine's memory) to ``mx.device_info()`` so the trainer can run, and says so.
* MFU (SFT rows): model FLOPs per token (PaLM, Chowdhury et al. 2022, appendix B, adapted to
  LoRA): frozen weights take a forward and an input-gradient pass (2N + 2N), LoRA weights a
  full training pass (6 N_lora), attention 12 * n_layer * d_model * seq_len (QK^T and AV on
  the full seq_len x seq_len matrices, forward and backward):
      FLOPs/token = 4 N + 6 N_lora + 12 n_layer d_model seq_len
  N counts every weight matrix a token is multiplied with (per layer 12 d^2 for GPT-2 with
  4d MLP, plus the vocab x d LM head); embedding look-ups, biases and norms are left out.
  MFU = FLOPs/token x tokens/s / peak, the peak being the best time of a float32
  ``--matmul-size`` square matmul in the same framework (its own subprocess), on this machine.

Models: ``tiny`` is the bundled 3.49M GPT-2 (``mlxpost.assets.DEFAULT_MODEL``);
``gpt2-124m`` is a random GPT-2 with the 124M shape, built in a temporary directory by
``scripts/bench.py``'s ``build_models`` and given the bundled tokenizer (ids < 1024 < its
vocab), so both models see the same token ids. mlx-lm loads GPT-2 only from the original key
layout with ``n_ctx`` in config.json, so MLX peers get a converted copy (same weights).
The 124M model and the MLX tools use smaller plans (see ``plan.PLANS``; MLX's Linux CPU build uses
a reference BLAS, far slower than torch here: ``--mlx-preload`` an optimised one); within a
framework every tool runs the same plan. Torch uses its default thread count unless
``--torch-threads`` says otherwise (on a machine shared with other work, 1 thread gives
steadier figures: two threads that must meet at every kernel wait for each other).

Run (``pip install -c constraints/linux-cpu.txt -e '.[bench]'`` first on CPU-only Linux):

    python scripts/bench_peers.py                  # everything, writes docs/bench_peers.md
    python scripts/bench_peers.py --quick          # 1-2 minute smoke run (tiny model, few steps)
    python scripts/bench_peers.py --tasks sft --tools mlxpost-torch,trl --models tiny
    python scripts/bench_peers.py --json bench_peers.json --markdown ''   # JSON only

The code, in ``scripts/peer_bench/``: ``plan`` (tools, settings, shapes, the FLOP model, the
reward), ``cli`` and ``run`` (the options; the parent that runs every job in a worker
subprocess), ``worker`` (a subprocess's entry), ``prepare`` (models, data, calibration),
``measuring`` (step timers, memory, data every worker shares), one ``tool_*`` module per tool
(mlxpost, TRL, mlx-lm, mlx-lm-lora), ``results`` and ``report`` (docs/bench_peers.md).
"""

from peer_bench.cli import main  # scripts/ is on sys.path: this file's folder

if __name__ == "__main__":
    main()
