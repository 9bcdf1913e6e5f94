"""Generic token transformer and its embeddings, shared by every domain."""

from core.nn.embeddings import (
    ConditionDropout,
    LabelEmbedder,
    RotaryEmbedding,
    TimestepEmbedder,
    apply_rotary,
    grid_positions,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
    sincos_pos_embed_3d,
    sincos_pos_embed_nd,
    timestep_embedding,
)
from core.nn.transformer import (
    Attention,
    CrossAttention,
    DiTBlock,
    FinalLayer,
    Mlp,
    TokenTransformer,
    TransformerConfig,
    modulate,
    sample_keep_idx,
)

__all__ = [
    "Attention",
    "ConditionDropout",
    "CrossAttention",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "Mlp",
    "RotaryEmbedding",
    "TimestepEmbedder",
    "TokenTransformer",
    "TransformerConfig",
    "apply_rotary",
    "grid_positions",
    "modulate",
    "sample_keep_idx",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "sincos_pos_embed_3d",
    "sincos_pos_embed_nd",
    "timestep_embedding",
]
