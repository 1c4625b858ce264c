"""ContextParallelConfig: the validated context-parallel settings, one dataclass.

Every rule of REFERENCE.md section 1 lives here as a small check that returns a message naming
the ``--dashed-flag`` to change. ``validate`` runs them all; the attention entry point reuses the
same checks on the shapes it receives, so a bad combination is caught identically on every rank
before any collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

ULYSSES = "ulysses_cp_algo"
RING = "megatron_cp_algo"
HYBRID = "hybrid_cp_algo"
KVALLGATHER = "kvallgather_cp_algo"
ALGORITHMS = (ULYSSES, RING, HYBRID, KVALLGATHER)
MASK_TYPES = ("causal", "general")
KV_CACHE_POLICIES = ("full", "half")
BACKENDS = ("auto", "npu", "torch", "reference")
ALL_TO_ALL_KINDS = ("collective", "p2p")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ContextParallelConfig:
    """Context-parallel settings, field for field the MindSpeed-style flags (snake_case).

    Attributes:
        context_parallel_size: CP degree ``cp`` (``--context-parallel-size``).
        context_parallel_algo: ``ulysses_cp_algo`` | ``megatron_cp_algo`` (ring) |
            ``hybrid_cp_algo`` (USP) | ``kvallgather_cp_algo`` (K/V all-gathered once, local
            queries; the ring's split).
        ulysses_degree_in_cp: Ulysses degree ``u`` for the hybrid algorithm; ring degree is cp/u.
        attention_mask_type: ``causal`` (load-balanced split) or ``general`` (full or explicit mask,
            contiguous split).
        attention_backend: block kernel: ``auto`` | ``npu`` | ``torch`` | ``reference``.
        use_cp_send_recv_overlap: ring sends and receives on two communicators over the same ranks.
        megatron_cp_in_bnsd: NPU backend: hand each block to the fused op in BNSD instead of SBH.
        use_fused_ring_attention_update: merge ring steps with the fused op (C++ on CPU,
            ``npu_ring_attention_update`` on NPU): ``None`` = where one exists, ``True`` = always
            (error if unavailable), ``False`` = the composed PyTorch formula.
        cp_window_size: double ring (ring and hybrid): ring ranks are cut into windows of this
            many consecutive ring ranks; an inner ring runs inside each window, an outer ring
            across windows. ``1`` = the plain ring.
        context_parallel_kv_cache_policy: ``None`` | ``full`` | ``half``. Ring: keep the K/V
            blocks (full) or only K (half) received in the forward so the backward does not
            receive them again. Ulysses: keep the K/V before the all-to-all (full: K and V;
            half: K) and redo that all-to-all in the backward, instead of keeping its output.
        context_parallel_cache_interval: ``0`` applies the policy to every layer; ``n > 0`` only
            to layers with ``layer_number % (n + 1) == 1`` (MindSpeed's rule).
        use_ulysses_allgather_kv: Ulysses with GQA: all-gather K/V over the Ulysses group and
            all-to-all only the queries, instead of replicating K/V heads before the all-to-all.
        ulysses_pipeline_chunks: head chunks of the pipelined Ulysses all-to-all (u > 1):
            ``None`` = the rule of ``usp_npu.algorithms.usp.pipeline_chunks``, ``1`` = no
            pipelining; must divide the heads each rank holds after the all-to-all.
        ulysses_all_to_all: how the Ulysses all-to-all travels: ``collective`` (one
            ``all_to_all_single``) or ``p2p`` (a receive and a send per peer, receives posted
            first: for gloo across hosts, whose collective can run the two directions of a
            link one after the other; ``usp_npu/comm/p2p.py``).
    """

    context_parallel_size: int = 1
    context_parallel_algo: str = ULYSSES
    ulysses_degree_in_cp: int | None = None
    attention_mask_type: str = "causal"
    attention_backend: str = "auto"
    use_cp_send_recv_overlap: bool = False
    megatron_cp_in_bnsd: bool = False
    use_fused_ring_attention_update: bool | None = None
    cp_window_size: int = 1
    context_parallel_kv_cache_policy: str | None = None
    context_parallel_cache_interval: int = 0
    use_ulysses_allgather_kv: bool = False
    ulysses_pipeline_chunks: int | None = None
    ulysses_all_to_all: str = "collective"

    @property
    def ulysses_p2p(self) -> bool:
        """Whether the Ulysses all-to-all runs as point-to-point exchanges (``p2p``)."""
        return self.ulysses_all_to_all == "p2p"

    @classmethod
    def from_args(cls, args: object) -> ContextParallelConfig:
        """Build from an ``argparse.Namespace`` (or any object) carrying the flags' attributes."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**values)

    # -- derived degrees -------------------------------------------------------------------
    @property
    def causal(self) -> bool:
        return self.attention_mask_type == "causal"

    @property
    def ulysses_degree(self) -> int:
        """``u``: ranks that exchange heads through the all-to-all."""
        cp = self.context_parallel_size
        if self.context_parallel_algo == ULYSSES:
            return cp
        if self.context_parallel_algo in (RING, KVALLGATHER):
            return 1
        return self.ulysses_degree_in_cp or 1

    @property
    def ulysses_flag(self) -> str:
        """The flag that sets the Ulysses degree for this algorithm (for error messages)."""
        return (
            "--context-parallel-size"
            if self.context_parallel_algo == ULYSSES
            else ("--ulysses-degree-in-cp")
        )

    @property
    def ring_degree(self) -> int:
        """``r = cp / u``: ranks on one ring."""
        return self.context_parallel_size // max(self.ulysses_degree, 1)

    # -- validation ------------------------------------------------------------------------
    def validate(
        self,
        num_attention_heads: int,
        seq_length: int,
        tensor_model_parallel_size: int = 1,
        num_query_groups: int | None = None,
        world_size: int | None = None,
        pipeline_model_parallel_size: int = 1,
        num_layers: int | None = None,
    ) -> ContextParallelConfig:
        """Check every rule for this algorithm; raise ValueError naming the flag(s) to change.

        ``num_layers`` (optional) checks ``--context-parallel-cache-interval < --num-layers``.
        Returns ``self`` so calls can be chained.
        """
        problems = self.settings_errors()
        if not problems:
            problems += self.parallel_errors(
                tensor_model_parallel_size, world_size, pipeline_model_parallel_size
            )
        if not problems:  # the head rules divide by the parallel sizes checked above
            problems += self.head_errors(
                num_attention_heads, num_query_groups, tensor_model_parallel_size
            )
            problems += self.sequence_errors(seq_length)
            problems += self.gqa_option_errors(num_attention_heads, num_query_groups)
            n = self.context_parallel_cache_interval
            if num_layers is not None and n >= num_layers > 0:
                problems.append(
                    f"--context-parallel-cache-interval {n} must be smaller than --num-layers "
                    f"{num_layers} (no layer would be cached beyond the first)"
                )
        if problems:
            raise ValueError("invalid context-parallel settings:\n  - " + "\n  - ".join(problems))
        return self

    def settings_errors(self) -> list[str]:
        """Rules on the CP flags alone."""
        cp, algo, u = (
            self.context_parallel_size,
            self.context_parallel_algo,
            self.ulysses_degree_in_cp,
        )
        if not isinstance(cp, int) or cp < 1:
            return [f"--context-parallel-size must be an integer >= 1, got {cp!r}"]
        if algo not in ALGORITHMS:
            return [f"--context-parallel-algo must be one of {', '.join(ALGORITHMS)}; got {algo!r}"]
        errors = []
        chunks = self.ulysses_pipeline_chunks
        if chunks is not None and (not isinstance(chunks, int) or chunks < 1):
            errors.append(f"--ulysses-pipeline-chunks must be an integer >= 1, got {chunks!r}")
        if self.ulysses_all_to_all not in ALL_TO_ALL_KINDS:
            errors.append(
                "--ulysses-all-to-all must be one of "
                f"{', '.join(ALL_TO_ALL_KINDS)}; got {self.ulysses_all_to_all!r}"
            )
        if self.attention_mask_type not in MASK_TYPES:
            errors.append(
                f"--attention-mask-type must be causal or general; got {self.attention_mask_type!r}"
            )
        if self.attention_backend not in BACKENDS:
            errors.append(
                f"--attention-backend must be one of {', '.join(BACKENDS)}; "
                f"got {self.attention_backend!r}"
            )
        if algo != HYBRID and u is not None and u != self.ulysses_degree:
            errors.append(
                f"--ulysses-degree-in-cp {u} only applies to --context-parallel-algo hybrid_cp_algo "
                f"(the {algo} degree is fixed to {self.ulysses_degree}); drop the flag or switch "
                "the algorithm"
            )
        if algo == HYBRID:
            if u is None:
                errors.append(
                    "--context-parallel-algo hybrid_cp_algo needs --ulysses-degree-in-cp "
                    f"(a divisor of --context-parallel-size {cp} below it: "
                    f"{', '.join(map(str, _divisors(cp)[:-1])) or 'none'})"
                )
            elif u < 1 or cp % u != 0:
                errors.append(
                    f"--ulysses-degree-in-cp {u} must divide --context-parallel-size {cp} "
                    f"(ring degree = cp / u); valid values: "
                    f"{', '.join(map(str, _divisors(cp)[:-1]))}"
                )
            elif u == cp:
                errors.append(
                    f"--ulysses-degree-in-cp {u} equals --context-parallel-size {cp}: the ring degree "
                    "would be 1, which is plain Ulysses; use --context-parallel-algo ulysses_cp_algo "
                    "or choose a smaller --ulysses-degree-in-cp"
                )
        if not errors:
            errors += self.option_errors()
        return errors

    def option_errors(self) -> list[str]:
        """Rules on the double-ring, KV-cache and all-gather-KV flags (MindSpeed's, spelled out)."""
        cp, algo, w = self.context_parallel_size, self.context_parallel_algo, self.cp_window_size
        errors = []
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            errors.append(f"--cp-window-size must be an integer >= 1, got {w!r}")
        elif w > 1:
            r = self.ring_degree
            ring = f"ring degree {r} (--context-parallel-size {cp}" + (
                f" / --ulysses-degree-in-cp {self.ulysses_degree})" if algo == HYBRID else ")"
            )
            valid = [d for d in _divisors(r) if d < r]
            if algo not in (RING, HYBRID):
                errors.append(
                    f"--cp-window-size {w} (double ring) needs a ring: --context-parallel-algo "
                    f"megatron_cp_algo or hybrid_cp_algo, not {algo}; drop the flag or switch "
                    "the algorithm"
                )
            elif w >= r or r % w != 0:
                errors.append(
                    f"--cp-window-size {w} must divide the {ring} and be smaller than it "
                    f"(windows of w consecutive ring ranks); valid values: "
                    f"{', '.join(map(str, valid))}"
                )
        policy, interval = (
            self.context_parallel_kv_cache_policy,
            self.context_parallel_cache_interval,
        )
        if policy is not None:
            if policy not in KV_CACHE_POLICIES:
                errors.append(
                    f"--context-parallel-kv-cache-policy must be full or half, got {policy!r}"
                )
            elif cp == 1:
                errors.append(
                    f"--context-parallel-kv-cache-policy {policy} needs --context-parallel-size "
                    "> 1 (there is no K/V communication to save or redo with cp 1)"
                )
            elif algo == KVALLGATHER:
                errors.append(
                    f"--context-parallel-kv-cache-policy {policy} applies to ulysses_cp_algo, "
                    "megatron_cp_algo and hybrid_cp_algo; kvallgather_cp_algo already keeps the "
                    "gathered K/V for the backward: drop the flag"
                )
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 0:
            errors.append(
                f"--context-parallel-cache-interval must be an integer >= 0, got {interval!r}"
            )
        elif interval > 0 and policy is None:
            errors.append(
                f"--context-parallel-cache-interval {interval} only applies with "
                "--context-parallel-kv-cache-policy full or half; set a policy or drop the "
                "interval"
            )
        if self.use_ulysses_allgather_kv:
            if algo != ULYSSES:
                errors.append(
                    "--use-ulysses-allgather-kv needs --context-parallel-algo ulysses_cp_algo, "
                    f"not {algo}"
                )
            elif cp == 1:
                errors.append(
                    "--use-ulysses-allgather-kv needs --context-parallel-size > 1 (there is no "
                    "Ulysses group with cp 1)"
                )
        return errors

    def kv_cache_policy(self, layer_number: int | None = None) -> str | None:
        """The KV cache policy for layer ``layer_number`` (1-based, as Megatron counts).

        ``--context-parallel-cache-interval`` ``n``: 0 caches every layer, ``n > 0`` only
        layers with ``layer_number % (n + 1) == 1``; ``None`` counts as a cached layer.
        """
        policy, n = self.context_parallel_kv_cache_policy, self.context_parallel_cache_interval
        if policy is None or n == 0 or layer_number is None:
            return policy
        return policy if layer_number % (n + 1) == 1 else None

    def parallel_errors(
        self,
        tensor_model_parallel_size: int,
        world_size: int | None,
        pipeline_model_parallel_size: int,
    ) -> list[str]:
        tp, pp, cp = (
            tensor_model_parallel_size,
            pipeline_model_parallel_size,
            self.context_parallel_size,
        )
        errors = [
            f"{flag} must be an integer >= 1, got {value!r}"
            for flag, value in (
                ("--tensor-model-parallel-size", tp),
                ("--pipeline-model-parallel-size", pp),
            )
            if not isinstance(value, int) or value < 1
        ]
        if errors:
            return errors
        if world_size is not None and world_size % (tp * cp * pp) != 0:
            return [
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                f"--context-parallel-size {cp} x --pipeline-model-parallel-size {pp} = {tp * cp * pp}"
            ]
        return []

    def head_errors(
        self,
        num_attention_heads: int,
        num_query_groups: int | None,
        tensor_model_parallel_size: int,
    ) -> list[str]:
        """Head-count rules, on the global counts (``--num-attention-heads``, ``--num-query-groups``)."""
        tp, u = tensor_model_parallel_size, self.ulysses_degree
        heads, groups = num_attention_heads, num_query_groups
        if heads % (u * tp) != 0:
            if u == 1:  # a pure ring: only tensor parallelism splits heads
                return [
                    f"--num-attention-heads {heads} must be divisible by "
                    f"--tensor-model-parallel-size {tp} (each tensor-parallel rank takes whole heads)"
                ]
            return [
                f"--num-attention-heads {heads} must be divisible by {self.ulysses_flag} {u} x "
                f"--tensor-model-parallel-size {tp} = {u * tp} (each Ulysses rank takes whole heads)"
                + (
                    "; --context-parallel-algo megatron_cp_algo or hybrid_cp_algo has no such limit"
                    if self.context_parallel_algo == ULYSSES
                    else ""
                )
            ]
        if groups is None:
            return self.pipeline_chunk_errors(heads // tp, heads // tp)
        if groups < 1 or heads % groups != 0:
            return [f"--num-query-groups {groups} must divide --num-attention-heads {heads}"]
        if groups % tp != 0:
            return [
                f"--num-query-groups {groups} must be divisible by "
                f"--tensor-model-parallel-size {tp}"
            ]
        return self.local_head_errors(heads // tp, groups // tp)

    def local_head_errors(self, local_heads: int, local_kv_heads: int) -> list[str]:
        """Head rules on one tensor-parallel rank's head counts (what the tensors show)."""
        u = self.ulysses_degree
        if local_heads % u != 0:
            return [
                f"{local_heads} query heads per tensor-parallel rank are not divisible by the Ulysses "
                f"degree {u}: change --num-attention-heads, --tensor-model-parallel-size or "
                f"{self.ulysses_flag}"
            ]
        if local_heads % local_kv_heads != 0:
            return [
                f"{local_heads} query heads are not a multiple of {local_kv_heads} key/value heads"
            ]
        # all-gather KV: every rank gathers all K/V heads; the rule below still makes each
        # rank's query heads use whole K/V heads
        if self.use_ulysses_allgather_kv and u > 1 and local_kv_heads >= local_heads:
            return [
                "--use-ulysses-allgather-kv needs fewer key/value heads than query heads "
                f"(grouped-query attention); got {local_kv_heads} K/V and {local_heads} query "
                "heads per tensor-parallel rank: drop the flag"
            ]
        if u > 1 and local_kv_heads % u != 0 and u % local_kv_heads != 0:
            return [
                f"{local_kv_heads} key/value heads per tensor-parallel rank and Ulysses degree {u}: "
                "one must divide the other (K/V heads are split, or replicated, across the Ulysses "
                f"group); change --num-query-groups or {self.ulysses_flag} (Ulysses degree {u})"
            ]
        return self.pipeline_chunk_errors(local_heads, local_kv_heads)

    def pipeline_chunk_errors(self, local_heads: int, local_kv_heads: int) -> list[str]:
        """``--ulysses-pipeline-chunks`` must divide the heads each rank holds after the all-to-all."""
        u, chunks = self.ulysses_degree, self.ulysses_pipeline_chunks
        if u > 1 and chunks is not None:
            common = math.gcd(local_heads // u, max(local_kv_heads, u) // u)
            if common % chunks:
                return [
                    f"--ulysses-pipeline-chunks {chunks} must divide the {local_heads // u} query "
                    f"and {max(local_kv_heads, u) // u} K/V heads each rank holds after the "
                    f"all-to-all (divisors of {common}); change it or leave it unset"
                ]
        return []

    def gqa_option_errors(
        self, num_attention_heads: int, num_query_groups: int | None
    ) -> list[str]:
        """``--use-ulysses-allgather-kv`` is for grouped-query attention (fewer K/V heads)."""
        if not self.use_ulysses_allgather_kv:
            return []
        if num_query_groups is None or num_query_groups >= num_attention_heads:
            return [
                "--use-ulysses-allgather-kv needs grouped-query attention: --num-query-groups "
                f"{num_query_groups} must be given and below --num-attention-heads "
                f"{num_attention_heads}"
            ]
        return []

    def sequence_errors(self, seq_length: int) -> list[str]:
        """Sequence-length rules for the split this algorithm and mask type use."""
        cp, u, r = self.context_parallel_size, self.ulysses_degree, self.ring_degree
        causal, algo = self.causal, self.context_parallel_algo
        if seq_length < 1:
            return [f"--seq-length must be positive, got {seq_length}"]
        if algo == ULYSSES or (not causal):
            need, why = cp, f"--context-parallel-size {cp}"
            if algo == HYBRID:
                why = f"ring degree {r} x --ulysses-degree-in-cp {u} = {cp}"
        elif algo in (RING, KVALLGATHER):
            need, why = 2 * cp, f"2 x --context-parallel-size {cp} (causal load-balanced split)"
        else:
            # 2r chunks, then each ring rank's two chunks are cut into u pieces: seq % 2r == 0 and
            # (seq / r) % u == 0, i.e. seq divisible by r * lcm(2, u)
            need = r * math.lcm(2, u)
            why = (
                f"ring degree {r} x lcm(2, --ulysses-degree-in-cp {u}) = {need} (causal "
                "load-balanced split into 2 x ring-degree chunks, each ring rank's share cut "
                "into u pieces)"
            )
        if seq_length % need != 0:
            below = seq_length - seq_length % need
            lo, hi = (below, below + need) if below > 0 else (need, 2 * need)
            return [
                f"--seq-length {seq_length} must be divisible by {why} (the sequence is never "
                f"truncated or padded); nearest valid: {lo} or {hi}"
            ]
        return []
