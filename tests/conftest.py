import pytest
import torch

from bytelm import ByteTransformer, Megabyte, MegabyteConfig, TransformerConfig

# Every invariant is checked on both models and both position schemes.
CONFIGS = {
    "megabyte-rope": MegabyteConfig.from_name("tiny"),
    "megabyte-learned": MegabyteConfig.from_name("tiny", pos_emb="learned", bias=True),
    "transformer-rope": TransformerConfig.from_name("tiny"),
    "transformer-learned": TransformerConfig.from_name("tiny", pos_emb="learned", bias=True),
}


def make(cfg):
    torch.manual_seed(0)
    model = Megabyte(cfg) if isinstance(cfg, MegabyteConfig) else ByteTransformer(cfg)
    return model.eval()


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def model(request):
    return make(CONFIGS[request.param])


@pytest.fixture
def megabyte():
    return make(CONFIGS["megabyte-rope"])
