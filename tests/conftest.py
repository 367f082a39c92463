import pytest
import torch

from bytelm import ByteTransformer, Megabyte, MegabyteConfig, TransformerConfig

# Every invariant is checked on both models and both position schemes.
CONFIGS = {
    "megabyte-rope": MegabyteConfig.from_name("tiny"),  # bytelm's default: half a patch of local context, norms
    "megabyte-learned": MegabyteConfig.from_name("tiny", pos_emb="learned", bias=True),
    "megabyte-paper": MegabyteConfig.from_name("tiny", local_context=0, local_norms=False),
    "megabyte-paper-learned": MegabyteConfig.from_name("tiny", pos_emb="learned", bias=True, local_context=0,
                                                       local_norms=False),
    "megabyte-context1": MegabyteConfig.from_name("tiny", local_context=1, local_norms=False),
    "megabyte-context4": MegabyteConfig.from_name("tiny", local_context=4),  # a whole patch
    "megabyte-context6": MegabyteConfig.from_name("tiny", local_context=6, pos_emb="learned"),  # W > P
    "megabyte-ctxglobal": MegabyteConfig.from_name("tiny", context_global=True),
    "megabyte-ctxglobal1": MegabyteConfig.from_name("tiny", local_context=1, context_global=True),
    "megabyte-ctxglobal6": MegabyteConfig.from_name("tiny", local_context=6, context_global=True, bias=True),
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
