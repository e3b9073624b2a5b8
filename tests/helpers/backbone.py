"""A tiny Hugging Face DINOv2 (weights moved off their init) and its weights in Meta's own layout."""
import torch

from dinov2od.modeling import build_dinov2_config

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=56)


def hf_model(registers=False, **overrides):
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    torch.manual_seed(0)
    config = build_dinov2_config("tiny", registers, **{**TINY, **overrides})
    model = (Dinov2WithRegistersModel if registers else Dinov2Model)(config).eval()
    with torch.no_grad():  # non-trivial layer scales, biases and tokens
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def to_official(model):
    """Write the HF state dict in the official DINOv2 layout (inverse of the loader's mapping)."""
    sd = model.state_dict()
    out = {}
    emb = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.register_tokens": "register_tokens",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    for k, v in emb.items():
        if k in sd:
            out[v] = sd[k]
    out["mask_token"] = sd["embeddings.mask_token"].reshape(1, -1)
    for i, layer in enumerate(model.encoder.layer):
        p, att = f"blocks.{i}.", layer.attention
        if hasattr(att, "q_proj"):
            q, k, v, o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        else:
            q, k, v, o = att.attention.query, att.attention.key, att.attention.value, att.output.dense
        for s in ("weight", "bias"):
            out[p + "attn.qkv." + s] = torch.cat([getattr(q, s), getattr(k, s), getattr(v, s)], 0)
            out[p + "attn.proj." + s] = getattr(o, s)
            out[p + "norm1." + s] = getattr(layer.norm1, s)
            out[p + "norm2." + s] = getattr(layer.norm2, s)
            mlp = layer.mlp
            if hasattr(mlp, "fc1"):
                out[p + "mlp.fc1." + s] = getattr(mlp.fc1, s)
                out[p + "mlp.fc2." + s] = getattr(mlp.fc2, s)
            elif hasattr(mlp, "weights_in"):
                out[p + "mlp.w12." + s] = getattr(mlp.weights_in, s)
                out[p + "mlp.w3." + s] = getattr(mlp.weights_out, s)
            else:
                out[p + "mlp.w12." + s] = torch.cat([getattr(mlp.gate_proj, s), getattr(mlp.up_proj, s)], 0)
                out[p + "mlp.w3." + s] = getattr(mlp.down_proj, s)
        out[p + "ls1.gamma"] = layer.layer_scale1.lambda1
        out[p + "ls2.gamma"] = layer.layer_scale2.lambda1
    return {k: v.detach().clone() for k, v in out.items()}
