"""What each suite measures: model shapes, lengths and budgets.

`full` is what the README's table quotes; `quick` checks the same things in under 10 minutes on a 2-core CPU;
`smoke` runs every benchmark on `tiny` shapes for about a second each, so the tests keep them from rotting.

The shapes (chosen for a 2-core CPU, not a GPU):
- `megabyte`: P=8, global 256 wide x 8 layers, local 64 x 2 (6.4M). megabyte-pytorch at this shape has 4.4% more
  parameters (its patch embedder and global-to-local projection are full P*D_L x G matrices).
- `transformer_eq`: the byte transformer with the same parameter count (256 x 8, 6.4M): training and quality.
- `transformer_gen`: a byte transformer with ~1/3.4 of MEGABYTE's parameters (192 x 4, 1.9M), as in the paper's
  Table 9 (a 1.3B+218M MEGABYTE against a 350M transformer: 4.3x).
- `long_megabyte` / `long_transformer`: a small MEGABYTE with a larger patch (P=16) and the transformer of equal
  parameters, for one forward pass over up to 1,048,576 bytes.
- `long_train_megabyte` / `long_train_transformer`: the same widths with P=32 (the paper's patch for its long audio
  sequences), for one training step over up to 1,048,576 bytes: the global model's attention over K = T/P patches
  is the step's quadratic cost, and P=32 halves K, quartering it (32,768 patches at 1M bytes), where P=16's
  forward alone took 143 s (long_context.md); the transformer of equal parameters.
- `MEDIA_*` (benchmarks/media.py, images and audio through the CLI): MEGABYTE of ~0.93M parameters (global 128 x 4,
  local 64 x 2; P=4 for 28x28 images, P=16 for 4,096-byte audio windows) against a byte transformer of ~1.05M
  (128 x 5): small, because each trains on one shared CPU thread for a few minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bytelm import MegabyteConfig, TransformerConfig

MB = dict(patch_size=8, global_dim=256, global_layers=8, global_heads=4, local_dim=64, local_layers=2, local_heads=2)
LONG_TRAIN_MB = dict(patch_size=32, global_dim=256, global_layers=4, global_heads=4, local_dim=64, local_layers=2,
                     local_heads=2)
LONG_MB = dict(patch_size=16, global_dim=256, global_layers=4, global_heads=4, local_dim=64, local_layers=2,
               local_heads=2)
MEDIA_IMAGE_MB = dict(patch_size=4, global_dim=128, global_layers=4, global_heads=4, local_dim=64, local_layers=2,
                      local_heads=2)
MEDIA_AUDIO_MB = {**MEDIA_IMAGE_MB, "patch_size": 16}
MEDIA_TF = dict(dim=128, layers=5, heads=4)


@dataclass
class Suite:
    name: str
    megabyte: MegabyteConfig
    transformer_eq: TransformerConfig
    transformer_gen: TransformerConfig
    long_megabyte: MegabyteConfig
    long_transformer: TransformerConfig
    # generation
    gen_bytes: int = 8192
    gen_repeats: int = 3
    peer_gen_bytes: int = 1024  # bytes megabyte-pytorch really generates (a full forward per byte: quadratic)
    peer_points: int = 17  # prefix lengths at which its per-byte step is timed, integrated over gen_bytes
    # training throughput
    train_seq_len: int = 2048
    train_batch: int = 4
    train_steps: int = 5
    train_repeats: int = 3
    train_compile: bool = True  # also time both MEGABYTEs under torch.compile (about 30 s of compiling each)
    # long sequences
    long_lengths: list[int] = field(default_factory=lambda: [8192, 65536, 262144, 1048576])
    long_time_limit: float = 600.0  # seconds for one forward; longer ones are predicted from the fit and skipped
    # long sequences, one training step (benchmarks/long_training.py); None: the long_* models' widths, P=32
    long_train_megabyte: MegabyteConfig | None = None
    long_train_transformer: TransformerConfig | None = None
    long_train_lengths: list[int] = field(default_factory=lambda: [8192, 32768, 131072, 524288, 1048576])
    long_train_time_limit: float = 900.0  # seconds for one step; longer ones are predicted from the fit and skipped
    # quality at equal wall-clock
    quality_seconds: float = 300.0
    quality_seq_len: int = 1024
    quality_batch: int = 8
    # (the recipe, lr and every MEGABYTE's local-stack lr scale, is bytelm's default TrainConfig: benchmarks/quality.py)
    quality_eval_windows: int = 128
    # serving (continuous batching)
    serve_concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    serve_bytes: int = 256  # generated per request
    serve_rounds: int = 3  # requests per stream (closed loop)
    serve_max_len: int = 1024  # the models' context while serving (sizes the preallocated caches)
    serve_compile: bool = True  # also measure Engine(compile=True)
    # serving under random traffic (open loop): each client sends max(traffic_min_per_client,
    # ceil(traffic_requests / C)) requests, one after another, with exponential gaps between the end of one and the
    # next arrival; prompts are stdlib text, prompt and output lengths uniform in the ranges (inclusive)
    traffic_requests: int = 48
    traffic_min_per_client: int = 2
    traffic_gap_s: float = 0.05  # mean gap
    traffic_prompt_bytes: tuple[int, int] = (8, 300)
    traffic_output_bytes: tuple[int, int] = (32, 400)
    traffic_temperature: float = 0.8
    burst_streams: int = 16  # requests arriving at once, for time to first byte
    burst_repeats: int = 5
    swarm_bytes: int = 256  # generated per run through the swarm (benchmarks/swarm.py)
    # images and audio (benchmarks/media.py): both models train at once, one thread each, for media_seconds
    media_seconds: float = 480.0
    media_real: bool = True  # Fashion-MNIST and espeak-ng speech; False: small generated images and tones
    media_train_images: int = 60000
    media_test_images: int = 1000
    media_image_batch: int = 8
    media_train_clips: int = 40  # synthesised speech clips (3 verses each, ~10 s)
    media_test_clips: int = 4  # one verse each (~12 s)
    media_sample_rate: int = 8000
    media_audio_seq_len: int = 4096
    media_audio_batch: int = 2
    media_warmup_steps: int = 20
    media_image_mb: dict = field(default_factory=lambda: dict(MEDIA_IMAGE_MB))
    media_audio_mb: dict = field(default_factory=lambda: dict(MEDIA_AUDIO_MB))
    media_tf: dict = field(default_factory=lambda: dict(MEDIA_TF))

    def __post_init__(self) -> None:
        if self.long_train_megabyte is None:
            self.long_train_megabyte = MegabyteConfig(max_seq_len=self.long_megabyte.max_seq_len, **LONG_TRAIN_MB)
        if self.long_train_transformer is None:
            self.long_train_transformer = self.long_transformer


def _pair(seq: int, **mb) -> tuple[MegabyteConfig, TransformerConfig, TransformerConfig]:
    return (MegabyteConfig(max_seq_len=seq, **(mb or MB)),
            TransformerConfig(max_seq_len=seq, dim=256, layers=8, heads=4),
            TransformerConfig(max_seq_len=seq, dim=192, layers=4, heads=4))


def get(name: str) -> Suite:
    if name == "full":
        mb, teq, tgen = _pair(8192)
        return Suite("full", mb, teq, tgen, MegabyteConfig(max_seq_len=1 << 20, **LONG_MB),
                     TransformerConfig(max_seq_len=1 << 20, dim=256, layers=4, heads=4))
    if name == "quick":
        mb, teq, tgen = _pair(8192)
        return Suite("quick", mb, teq, tgen, MegabyteConfig(max_seq_len=1 << 16, **LONG_MB),
                     TransformerConfig(max_seq_len=1 << 16, dim=256, layers=4, heads=4),
                     gen_bytes=2048, gen_repeats=2, peer_gen_bytes=256, peer_points=9, train_steps=3,
                     train_repeats=2, long_lengths=[8192, 32768], long_time_limit=60.0,
                     long_train_lengths=[8192, 32768, 65536], long_train_time_limit=60.0, quality_seconds=60.0,
                     quality_eval_windows=32, serve_bytes=128, serve_rounds=2, traffic_requests=16,
                     traffic_min_per_client=1, burst_repeats=2, media_seconds=120.0,
                     media_train_images=20000, media_test_images=300, media_train_clips=16, media_test_clips=3)
    if name == "smoke":
        tiny_mb = MegabyteConfig.from_name("tiny", max_seq_len=256)
        tiny_t = TransformerConfig.from_name("tiny", max_seq_len=256)
        return Suite("smoke", tiny_mb, tiny_t, TransformerConfig(max_seq_len=256, dim=32, layers=1, heads=2),
                     MegabyteConfig.from_name("tiny", max_seq_len=1024), TransformerConfig.from_name(
                         "tiny", max_seq_len=1024),
                     gen_bytes=64, gen_repeats=1, peer_gen_bytes=16, peer_points=3, train_seq_len=64, train_batch=2,
                     train_steps=2, train_repeats=1, train_compile=False, long_lengths=[256, 1024],
                     long_time_limit=20.0, long_train_megabyte=MegabyteConfig.from_name("tiny", max_seq_len=1024),
                     long_train_transformer=TransformerConfig.from_name("tiny", max_seq_len=1024),
                     long_train_lengths=[1024], long_train_time_limit=20.0,
                     quality_seconds=1.0, quality_seq_len=64, quality_batch=2, quality_eval_windows=4,
                     serve_concurrency=[1, 4], swarm_bytes=16, serve_bytes=16, serve_rounds=1, serve_max_len=256,
                     serve_compile=False,
                     traffic_requests=4, traffic_min_per_client=1, traffic_gap_s=0.005, traffic_prompt_bytes=(8, 64),
                     traffic_output_bytes=(8, 32), burst_streams=4, burst_repeats=1,
                     media_seconds=0.5, media_real=False, media_train_images=64, media_test_images=8,
                     media_image_batch=4, media_train_clips=4, media_test_clips=2, media_audio_seq_len=256,
                     media_audio_batch=2, media_warmup_steps=2,
                     media_image_mb=dict(patch_size=4, global_dim=32, global_layers=1, global_heads=2, local_dim=16,
                                         local_layers=1, local_heads=2),
                     media_audio_mb=dict(patch_size=8, global_dim=32, global_layers=1, global_heads=2, local_dim=16,
                                         local_layers=1, local_heads=2),
                     media_tf=dict(dim=32, layers=1, heads=2))
    raise SystemExit(f"unknown suite {name!r}: choose quick, full or smoke")
