"""Damaged inputs for the readers of engine folders and LoRA files, shared by the fuzz tests (tests/fuzz) and
`python -m benchmarks.fuzz_report`: mutations of a folder's `manifest.json` at a JSON path, of an adapter pack
(`adapters/NAME.safetensors`) and of a LoRA file. What a reader did with one is judged in outcomes.py.

Every generator draws from a `random.Random`: the report replays a case from its seed, and the tests pass
hypothesis' `st.randoms()`, whose draws hypothesis shrinks to a small failing case.
"""
from __future__ import annotations

import copy
import json
import math
import re
import struct
from dataclasses import dataclass

import numpy as np

# --- values -----------------------------------------------------------------------------------------------
HUGE_INT = 10**400  # JSON holds it; Python reads an int that no float can hold
ESCAPES = ("../x", "../../../../etc/passwd", "/etc/passwd", "tokenizer/../../x", "./unet.onnx", "/", ".", "..",
           "a\x00b", "adapters\\..\\..\\x", "x" * 5000)
SCALARS = (None, True, False, 0, 1, -1, 2, 10**9, -10**9, 2**31, 2**63, 2**64, HUGE_INT, 0.0, -0.0, 0.5, -1.5,
           1e308, 5e-324, math.nan, math.inf, -math.inf, "", "x", "fp32", "unet", "float64", "é中🦊", "\ud800",
           "\x00", *ESCAPES)
CONTAINERS = ([], [None], [1, 2], ["x"], [[[]]], {}, {"": None}, {"a": 1}, {"name": "x", "file": "x"})
# absurd sizes where a size belongs (shapes, dims, offsets, lengths, ranks)
SIZES = (0, -1, -(2**63), 1, 3, 10**9, 2**32, 2**63, HUGE_INT)
_SEMANTIC_STRINGS = ("fp32", "fp16", "int8", "refit-inputs", "ort-cpu", "cfg", "none", "sd15", "tensorrt",
                     "onnxruntime", "float32", "float16", "int64", "bfloat16", "lcm", "style", "unet_batch")


def _kind(value) -> str:
    """A JSON value's type, bool apart from numbers."""
    if value is None or isinstance(value, bool):
        return repr(value)
    return {int: "number", float: "number", str: "string", list: "list", dict: "object"}[type(value)]


def show(value, limit: int = 60) -> str:
    """A value as short readable text: JSON-like, huge ints by their length."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**20:
        return f"{'-' if value < 0 else ''}<{len(str(abs(value)))}-digit int>"
    if isinstance(value, str) and len(value) > limit:
        return f"<{len(value)}-char string {value[:12]!r}...>"
    text = repr(value) if isinstance(value, (str, bytes)) else json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."


def path_text(path: tuple) -> str:
    """A JSON path as `components.unet.sha256["unet.onnx"]`, `adapters[1].pack`; () is the document."""
    text = ""
    for key in path:
        if isinstance(key, int):
            text += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key):
            text += f".{key}" if text else key
        else:
            text += f"[{json.dumps(key, ensure_ascii=False)}]"
    return text or "<document>"


@dataclass(frozen=True)
class Mutation:
    """One damaged file: what was done (`kind`), where (JSON path, tensor name or byte offset) and to what."""
    kind: str
    where: str
    value: str
    data: bytes

    def __str__(self) -> str:
        return " ".join(part for part in (self.kind, self.where, self.value and f"= {self.value}") if part)


# --- manifest.json ------------------------------------------------------------------------------------------
_DUPLICATE = "\x00lcmrt-fuzz-duplicate\x00"  # placeholder key, renamed in the JSON text
_NESTED = "\x00lcmrt-fuzz-nested\x00"  # placeholder value, replaced by deep nesting in the JSON text
FILE_KEYS = ("file", "path", "pack", "base")  # keys whose string values name files of the folder


def dumps(doc) -> bytes:
    """The manifest as `write_manifest` writes it (NaN and Infinity included, as Python's json writes them)."""
    return (json.dumps(doc, indent=2) + "\n").encode()


def _pick_path(doc, rnd, stop: float = 0.3) -> tuple:
    """A random path into `doc`: at each level stop with probability `stop`, else descend into a child, so every
    top-level part is as likely as the refit map's hundred entries."""
    path, node = (), doc
    while isinstance(node, (dict, list)) and node and (not path or rnd.random() > stop):
        key = rnd.choice(list(node)) if isinstance(node, dict) else rnd.randrange(len(node))
        path, node = path + (key,), node[key]
    return path


def _get(doc, path: tuple):
    for key in path:
        doc = doc[key]
    return doc


def file_references(doc, path=()) -> list[tuple]:
    """Paths of every string naming a file of the folder: values of FILE_KEYS, keys of `sha256` maps."""
    found = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if key in FILE_KEYS and isinstance(value, str):
                found.append(path + (key,))
            elif key == "sha256" and isinstance(value, dict):
                found += [path + (key, name, "<key>") for name in value]
            else:
                found += file_references(value, path + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += file_references(value, path + (i,))
    return found


def _new_value(current, rnd, extra: tuple = ()):
    """A replacement: mostly of another JSON type, sometimes an absurd value of the same type."""
    roll = rnd.random()
    if roll < 0.15 and _kind(current) == "number":
        return rnd.choice(SIZES + (math.nan, math.inf, 0.5))
    if roll < 0.25 and _kind(current) == "string":
        return rnd.choice(ESCAPES + extra + _SEMANTIC_STRINGS)
    if roll < 0.35:
        return rnd.choice(_SEMANTIC_STRINGS)
    pool = [v for v in SCALARS + CONTAINERS + extra if _kind(v) != _kind(current)]
    return copy.deepcopy(rnd.choice(pool))


# kind -> weight: mostly one value changed or removed, some damage to the text itself
MANIFEST_KINDS = {"replace": 30, "delete": 12, "file-name": 8, "wrap": 4, "rename": 7, "duplicate": 6, "add": 5,
                  "truncate": 6, "bytes": 7, "nest": 2, "document": 3}


def manifest_mutation(text: bytes, rnd, outside: tuple[str, ...] = ()) -> Mutation:
    """One random mutation of a valid manifest. `outside`: names of a file outside the folder (absolute, and
    relative to the folder) that a mutated value may point at; the caller checks that it is never read."""
    doc = json.loads(text)
    extra = tuple(outside)
    kind = rnd.choices(tuple(MANIFEST_KINDS), weights=tuple(MANIFEST_KINDS.values()))[0]
    if kind in ("truncate", "bytes", "nest", "document"):
        return _text_mutation(kind, doc, rnd)
    if kind == "file-name":
        refs = file_references(doc)
        path = rnd.choice(refs)
        new = rnd.choice(ESCAPES + extra + ("", "missing.onnx", "adapters/missing.safetensors", "manifest.json"))
        if path[-1] == "<key>":  # a sha256 map's key: the file it hashes
            hashes, old = _get(doc, path[:-2]), path[-2]
            hashes[new] = hashes.pop(old)
            return Mutation("rename-file", path_text(path[:-1]), show(new), dumps(doc))
        parent = _get(doc, path[:-1])
        parent[path[-1]] = new
        return Mutation("replace", path_text(path), show(new), dumps(doc))
    path = _pick_path(doc, rnd)
    parent, key = _get(doc, path[:-1]), path[-1]
    current = parent[key]
    if kind == "delete":
        del parent[key]
        return Mutation("delete", path_text(path), "", dumps(doc))
    if kind == "replace":
        parent[key] = new = _new_value(current, rnd, extra)
        return Mutation("replace", path_text(path), show(new), dumps(doc))
    if kind == "wrap":
        parent[key] = new = rnd.choice(([current], {"value": current}))
        return Mutation("wrap", path_text(path), "[...]" if isinstance(new, list) else '{"value": ...}', dumps(doc))
    if not isinstance(parent, dict):  # rename, duplicate and add need an object; in a list, drop the item
        del parent[key]
        return Mutation("delete", path_text(path), "", dumps(doc))
    if kind == "rename":
        new_key = rnd.choice((key.upper(), key + "_", " " + key, "", key.replace("_", "-"), key[:-1]))
        value = parent.pop(key)
        parent.setdefault(new_key, value)
        return Mutation("rename-key", path_text(path), show(new_key), dumps(doc))
    if kind == "duplicate":  # the same key twice: JSON readers keep the last, with the random value
        new = _new_value(current, rnd, extra)
        parent[_DUPLICATE] = new
        out = dumps(doc).replace(json.dumps(_DUPLICATE).encode(), json.dumps(key).encode(), 1)
        return Mutation("duplicate-key", path_text(path), show(new), out)
    new = _new_value(None, rnd, extra)
    name = rnd.choice(("unknown", "__proto__", "", "format_version", "é"))
    parent.setdefault(name, new)
    return Mutation("add-key", path_text(path[:-1] + (name,)), show(new), dumps(doc))


def _text_mutation(kind: str, doc, rnd) -> Mutation:
    text = dumps(doc)
    if kind == "truncate":
        cut = rnd.choice((0, 1, rnd.randrange(len(text)), len(text) - 2))
        return Mutation("truncate", f"at byte {cut} of {len(text)}", "", text[:cut])
    if kind == "bytes":
        choice = rnd.randrange(5)
        if choice == 0:
            return Mutation("encode", "document", "UTF-16", text.decode().encode("utf-16"))
        if choice == 1:
            return Mutation("prefix", "document", "UTF-8 BOM", b"\xef\xbb\xbf" + text)
        at = rnd.randrange(len(text))
        junk = rnd.choice((b"\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\x00", b"\xe9"))
        # inside a string value, the invalid bytes survive JSON's grammar and only decoding can refuse them
        at = text.find(b'"', at) + 1 or at
        return Mutation("insert-bytes", f"at byte {at}", show(junk), text[:at] + junk + text[at:])
    if kind == "nest":
        path = _pick_path(doc, rnd)
        depth = rnd.choice((64, 100_000))
        _get(doc, path[:-1])[path[-1]] = _NESTED
        out = dumps(doc).replace(json.dumps(_NESTED).encode(), b"[" * depth + b"]" * depth)
        return Mutation("nest", path_text(path), f"{depth} nested lists", out)
    new = copy.deepcopy(rnd.choice((None, 1, "manifest", [], [doc], {"format_version": 1}, {"format_version": 10**9},
                                    {"format_version": -1}, {"format_version": 1.0}, {"format_version": True})))
    return Mutation("replace", "<document>", show(new), dumps(new))


# --- safetensors files --------------------------------------------------------------------------------------
_ST_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "int8": "I8", "int16": "I16", "int32": "I32",
              "int64": "I64", "uint8": "U8", "bool": "BOOL"}
_NP_DTYPES = {v: np.dtype(k) for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class Raw:
    """A tensor numpy cannot hold (bfloat16) or whose header lies about its bytes."""
    dtype: str
    shape: tuple
    data: bytes


def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """A safetensors file (8-byte little-endian header size, JSON header, data) of numpy arrays or Raw tensors."""
    header, blobs, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        if isinstance(t, Raw):
            dtype, shape, raw = t.dtype, list(t.shape), t.data
        else:
            dtype, shape, raw = _ST_DTYPES[t.dtype.name], list(t.shape), np.ascontiguousarray(t).tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def read_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], dict | None]:
    """(tensors, metadata) of a valid safetensors file of numpy dtypes."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    metadata = header.pop("__metadata__", None)
    body = data[8 + size:]
    tensors = {name: np.frombuffer(body[a:b], dtype=_NP_DTYPES[h["dtype"]]).reshape(h["shape"]).copy()
               for name, h in header.items() for a, b in [h["data_offsets"]]}
    return tensors, metadata


def _bfloat16(array: np.ndarray) -> Raw:
    bits = np.asarray(array, np.float32).view(np.uint32) >> 16
    return Raw("BF16", array.shape, bits.astype("<u2").tobytes())


def _byte_mutation(data: bytes, rnd) -> Mutation:
    """Damage that ignores the format: bit flips, truncation, random bytes, a lying header."""
    (size,) = struct.unpack("<Q", data[:8])
    choice = rnd.randrange(5)
    if choice == 0:
        out = bytearray(data)
        # half the flips in the header, where a reader's parser has to refuse them
        spots = [rnd.randrange(8, 8 + size) if rnd.random() < 0.5 else rnd.randrange(len(data))
                 for _ in range(rnd.choice((1, 2, 8)))]
        for at in spots:
            out[at] ^= 1 << rnd.randrange(8)
        return Mutation("bit-flip", f"bytes {sorted(spots)[:4]}", "", bytes(out))
    if choice == 1:
        cut = rnd.choice((0, 4, 8, 8 + size // 2, 8 + size, rnd.randrange(len(data)), len(data) - 1))
        return Mutation("truncate", f"at byte {cut} of {len(data)}", "", data[:cut])
    if choice == 2:
        n = rnd.choice((1, 7, 8, 64, 4096))
        return Mutation("random-bytes", f"{n} bytes", "", rnd.randbytes(n))
    if choice == 3:
        new = rnd.choice((0, 1, 2, size + 1, len(data), 2**40, 2**64 - 1))
        return Mutation("header-size", "first 8 bytes", str(new), struct.pack("<Q", new) + data[8:])
    header = rnd.choice((b"not json", b"[]", b"null", b'{"a": 1}', b'{"x": {"dtype": "F32"}}', b"{" * 10000,
                         b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 999999]}}',
                         b'{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}',
                         b'{"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}',
                         b'{"__metadata__": {"format": 1}}', b'{"__metadata__": "x"}'))
    return Mutation("header", "JSON header", show(header.decode()), struct.pack("<Q", len(header)) + header + b"\0" * 8)


def _wrong_shape(array: np.ndarray, rnd) -> np.ndarray:
    choice = rnd.randrange(6)
    if choice == 0 and array.ndim >= 2:
        return np.ascontiguousarray(array.swapaxes(0, 1))
    if choice == 1:
        return array.reshape(-1)
    if choice == 2:
        return array[None]
    if choice == 3:
        return np.zeros((0,) + array.shape[1:], array.dtype)
    if choice == 4:
        return np.asarray(array.reshape(-1)[0] if array.size else 0, array.dtype).reshape(())
    return np.concatenate([array, array[:1]]) if array.ndim and len(array) else np.ones((2, 2), array.dtype)


def _damaged_values(kind: str, key: str, tensors: dict, metadata, rnd) -> "Mutation":
    """One tensor of a pack or LoRA file given another dtype, or NaN/inf values."""
    tensors[key], detail = (_wrong_dtype if kind == "dtype" else _non_finite)(tensors[key], rnd)
    return Mutation(kind, key, detail, safetensors_bytes(tensors, metadata))


def _wrong_dtype(array: np.ndarray, rnd):
    dtype = rnd.choice(("float16", "float64", "int8", "int32", "int64", "uint8", "bool", "bfloat16"))
    if dtype == "bfloat16":
        return _bfloat16(array), dtype
    with np.errstate(all="ignore"):
        return array.astype(dtype), dtype


def _non_finite(array: np.ndarray, rnd) -> tuple[np.ndarray, str]:
    out = np.array(array, dtype=array.dtype if array.dtype.kind == "f" else np.float32)
    value = rnd.choice((math.nan, math.inf, -math.inf))
    if out.size:
        out.reshape(-1)[rnd.randrange(out.size)] = value
    return out, show(value)


# --- adapter packs ------------------------------------------------------------------------------------------
def pack_mutation(data: bytes, rnd) -> Mutation:
    """One random mutation of a valid adapter pack ({module}.down [r, ...], .up [out, r, ...], .scale [1])."""
    if rnd.random() < 0.3:
        return _byte_mutation(data, rnd)
    tensors, metadata = read_safetensors(data)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    module = rnd.choice(modules)
    part = rnd.choice(("down", "up", "scale"))
    key = f"{module}.{part}"
    kind = rnd.choice(("drop-key", "drop-module", "extra-module", "extra-key", "shape", "dtype", "non-finite",
                       "rank-0", "rank-mismatch", "scale", "empty", "metadata"))
    if kind == "drop-key":
        del tensors[key]
        return Mutation(kind, key, "", safetensors_bytes(tensors, metadata))
    if kind == "drop-module":
        for p in ("down", "up", "scale"):
            del tensors[f"{module}.{p}"]
        return Mutation(kind, module, "", safetensors_bytes(tensors, metadata))
    if kind == "extra-module":
        name = rnd.choice(("unet.not_a_module", "text_encoder.x", "", "vae_decoder.conv_in", module + ".extra"))
        for p in ("down", "up", "scale"):
            tensors[f"{name}.{p}"] = tensors[f"{module}.{p}"]
        return Mutation(kind, name, f"copy of {module}", safetensors_bytes(tensors, metadata))
    if kind == "extra-key":
        name = rnd.choice(("junk", f"{module}.alpha", ".down", f"{module}.down.down", "é"))
        tensors[name] = np.ones(rnd.choice(((), (1,), (3, 3))), np.float32)
        return Mutation(kind, name, "", safetensors_bytes(tensors, metadata))
    if kind == "shape":
        tensors[key] = new = _wrong_shape(tensors[key], rnd)
        return Mutation(kind, key, str(list(new.shape)), safetensors_bytes(tensors, metadata))
    if kind in ("dtype", "non-finite"):
        return _damaged_values(kind, key, tensors, metadata, rnd)
    down, up = tensors[f"{module}.down"], tensors[f"{module}.up"]
    if kind == "rank-0":
        tensors[f"{module}.down"] = np.zeros((0,) + down.shape[1:], np.float32)
        tensors[f"{module}.up"] = np.zeros(up.shape[:1] + (0,) + up.shape[2:], np.float32)
        return Mutation(kind, module, "", safetensors_bytes(tensors, metadata))
    if kind == "rank-mismatch":
        tensors[f"{module}.up"] = np.concatenate([up, up[:, :1]], axis=1)
        return Mutation(kind, f"{module}.up", str(list(tensors[f"{module}.up"].shape)),
                        safetensors_bytes(tensors, metadata))
    if kind == "scale":
        new = rnd.choice(([], [math.nan], [0.0], [-1.0], [3.4e38], [1.0, 2.0], [[1.0]]))
        tensors[f"{module}.scale"] = np.array(new, np.float32)
        return Mutation(kind, f"{module}.scale", show(new), safetensors_bytes(tensors, metadata))
    if kind == "empty":
        return Mutation(kind, "all tensors", "", safetensors_bytes({}, metadata))
    new = rnd.choice(({}, {"format": "lcmrt-adapter/999"}, {"name": "other"}, None))
    return Mutation(kind, "__metadata__", show(new), safetensors_bytes(tensors, new))


# --- LoRA files ---------------------------------------------------------------------------------------------
# (format, part) -> key suffix; a module's name follows the format's convention (kohya: lora_unet_a_b_c)
_LORA_SUFFIX = {("kohya", "down"): ".lora_down.weight", ("kohya", "up"): ".lora_up.weight",
                ("peft", "down"): ".lora_A.weight", ("peft", "up"): ".lora_B.weight",
                ("diffusers", "down"): ".lora.down.weight", ("diffusers", "up"): ".lora.up.weight",
                ("legacy", "down"): "_lora.down.weight", ("legacy", "up"): "_lora.up.weight"}
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
_LORA_KEY = re.compile(r"^(.+?)(\.lora_down\.weight|\.lora_up\.weight|\.lora_A\.weight|\.lora_B\.weight|"
                       r"[._]lora(?:_linear_layer)?\.down\.weight|[._]lora(?:_linear_layer)?\.up\.weight|\.alpha)$")
LORA_METADATA = "lora_adapter_metadata"  # diffusers' adapter config in the header (alphas, rsLoRA)


def _lora_part(key: str) -> tuple[str, str] | None:
    """(module, "down" | "up" | "alpha") of a LoRA key, None for any other key."""
    m = _LORA_KEY.match(key)
    if m is None:
        return None
    suffix = m.group(2)
    return m.group(1), "alpha" if suffix == ".alpha" else "down" if ("down" in suffix or "lora_A" in suffix) else "up"


def lora_modules(tensors: dict) -> dict[str, dict]:
    """{module: {"down": key, "up": key, "alpha": key}} of a LoRA state dict in any of the formats."""
    modules: dict[str, dict] = {}
    for key in tensors:
        if part := _lora_part(key):
            modules.setdefault(part[0], {})[part[1]] = key
    return modules


def _lora_key(module: str, fmt: str, part: str) -> str:
    """The key of a dotted module name (`unet.a.b`, `text_encoder.text_model.x`) in format `fmt`."""
    if fmt == "kohya":
        component, _, local = module.partition(".")
        name = _KOHYA_PREFIX.get(component, "lora_") + local.removeprefix("text_model.").replace(".", "_")
        return name + (".alpha" if part == "alpha" else _LORA_SUFFIX[fmt, part])
    return module + (".alpha" if part == "alpha" else _LORA_SUFFIX[fmt, part])


def _alpha(choice: str | float) -> np.ndarray | None:
    """An .alpha tensor for `choice` (None: no alpha key)."""
    special = {"missing": None, "empty": np.zeros((0,), np.float32), "matrix": np.ones((2, 2), np.float32),
               "int": np.array(4, np.int64), "bool": np.array(True)}
    return special[choice] if isinstance(choice, str) else np.array(choice, np.float32)


def lora_mutation(data: bytes, rnd) -> Mutation:
    """One random mutation of a valid LoRA file (kohya, peft or diffusers keys)."""
    if rnd.random() < 0.2:
        return _byte_mutation(data, rnd)
    tensors, metadata = read_safetensors(data)
    modules = lora_modules(tensors)
    module = rnd.choice(sorted(modules))
    parts = modules[module]
    key = rnd.choice(sorted(parts.values()))
    kind = rnd.choice(("restyle", "restyle", "rename", "drop", "shape", "rank-0", "rank-mismatch", "alpha",
                       "dtype", "non-finite", "extra", "metadata", "empty", "subset"))
    if kind == "restyle" and all("." in name and not name.startswith("lora_") for name in modules):
        # every module's keys in one format (a valid LoRA in another convention), or each in a random one
        fmt = rnd.choice(("kohya", "peft", "diffusers", "legacy", "mixed"))
        out = {}
        for name, keys in modules.items():
            f = rnd.choice(("kohya", "peft", "diffusers", "legacy")) if fmt == "mixed" else fmt
            out.update({_lora_key(name, f, part): tensors[k] for part, k in keys.items()})
            if f == "kohya" and "alpha" not in keys and rnd.random() < 0.5:
                out[_lora_key(name, f, "alpha")] = np.array(float(tensors[keys["down"]].shape[0]), np.float32)
        return Mutation("restyle", "all keys", fmt, safetensors_bytes(out, metadata))
    if kind in ("restyle", "rename"):
        new = rnd.choice((key + "x", key.replace("lora", "LoRA"), key.replace(".weight", ".bias"),
                          key.replace("unet", "unet2"), "", "é.alpha", "base_model.model." + key,
                          key.replace("lora_A", "lora_magnitude_vector").replace("lora_down", "hada_w1_a"),
                          "lora_unet_" + "x" * 200 + ".lora_down.weight"))
        tensors[new] = tensors.pop(key)
        return Mutation("rename-key", key, show(new), safetensors_bytes(tensors, metadata))
    if kind == "drop":
        del tensors[key]
        return Mutation("drop-key", key, "", safetensors_bytes(tensors, metadata))
    if kind == "shape":
        tensors[key] = new = _wrong_shape(tensors[key], rnd)
        return Mutation(kind, key, str(list(new.shape)), safetensors_bytes(tensors, metadata))
    if kind == "rank-0" and {"down", "up"} <= set(parts):
        down, up = tensors[parts["down"]], tensors[parts["up"]]
        tensors[parts["down"]] = np.zeros((0,) + down.shape[1:], down.dtype)
        tensors[parts["up"]] = np.zeros(up.shape[:1] + (0,) + up.shape[2:], up.dtype)
        return Mutation(kind, module, "", safetensors_bytes(tensors, metadata))
    if kind == "rank-mismatch" and "up" in parts:
        up = tensors[parts["up"]]
        tensors[parts["up"]] = new = np.concatenate([up, up[:, :1]], axis=1) if up.ndim >= 2 else up[:0]
        return Mutation(kind, parts["up"], str(list(new.shape)), safetensors_bytes(tensors, metadata))
    if kind == "alpha":
        alpha_key = parts.get("alpha") or _lora_key(module, "peft", "alpha")
        choice = rnd.choice(("missing", math.nan, -4.0, 0.0, math.inf, 1e30, "empty", "matrix", "int", "bool"))
        tensors.pop(alpha_key, None)
        if (alpha := _alpha(choice)) is not None:
            tensors[alpha_key] = alpha
        return Mutation(kind, alpha_key, show(choice), safetensors_bytes(tensors, metadata))
    if kind in ("dtype", "non-finite"):
        return _damaged_values(kind, key, tensors, metadata, rnd)
    if kind == "extra":
        name, value = rnd.choice((
            ("junk.weight", np.ones((2, 2), np.float32)),
            (f"{module}.dora_scale", np.ones((4,), np.float32)),
            ("unet.nowhere.lora_A.weight", np.ones((4, 7), np.float32)),
            ("lora_unet_nowhere.lora_down.weight", np.ones((4, 7), np.float32)),
            (key.replace("lora_A", "lora.down").replace("lora_down", "lora.down"), tensors[key])))
        tensors[name] = value
        return Mutation("extra-key", name, str(list(value.shape)), safetensors_bytes(tensors, metadata))
    if kind == "metadata":
        config = rnd.choice(("not json", "[]", "null", '{"unet.lora_alpha": "x"}', '{"unet.lora_alpha": NaN}',
                             '{"unet.lora_alpha": 0}', '{"unet.lora_alpha": -8}', '{"unet.lora_alpha": [4]}',
                             '{"unet.lora_alpha": 4, "unet.alpha_pattern": {"[": 2}}',
                             '{"unet.lora_alpha": 4, "unet.alpha_pattern": ["to_q"]}',
                             '{"unet.lora_alpha": 4, "unet.alpha_pattern": {"to_q": "x"}}',
                             '{"unet.lora_alpha": 4, "unet.use_rslora": true}',
                             '{"text_encoder.lora_alpha": 1e400}'))
        return Mutation("metadata", LORA_METADATA, show(config),
                        safetensors_bytes(tensors, {**(metadata or {}), LORA_METADATA: config}))
    if kind == "empty":
        return Mutation(kind, "all tensors", "", rnd.choice((b"", safetensors_bytes({}, metadata))))
    keep = set(rnd.sample(sorted(modules), k=max(1, len(modules) // 4)))  # a partial LoRA
    out = {k: v for k, v in tensors.items() if (part := _lora_part(k)) and part[0] in keep}
    return Mutation("subset", f"{len(keep)} of {len(modules)} modules", "", safetensors_bytes(out, metadata))
