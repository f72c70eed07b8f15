//! safetensors: the header is parsed and its layout validated by the `safetensors` crate
//! before anything is allocated from it, the `__metadata__` names the architecture, and the
//! weights are either borrowed from a memory map (little-endian F32, 4-byte aligned) or copied
//! into one owned buffer.
//!
//! The layout each architecture expects is documented in `docs/model-format.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::{SafeTensorError, SafeTensors};
use serde_json::Value;

use crate::error::{Error, ErrorCode, Result};

/// Largest JSON header accepted (the reference implementation uses the same bound).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;
const MAX_TENSORS: usize = 4096;
const MAX_RANK: usize = 4;
const MAX_LAYERS: usize = 256;
const MAX_SEQUENCE_LENGTH: usize = 1 << 20;

fn format_error(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::ModelFormat, message)
}

/// Element types accepted in a file; F16 and BF16 are widened to F32 at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

/// One tensor as the header describes it; offsets are relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A validated header: every tensor's bytes lie inside the file and match its shape.
#[derive(Debug, Clone)]
pub struct Header {
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Offset of the data section from the start of the file.
    pub data_start: usize,
}

/// Parses and validates the header of a safetensors file held in `file`. The `safetensors`
/// crate parses it and checks the layout (the tensors' data_offsets tile the data section in
/// order, each spans exactly its shape × dtype, no size overflows); around it this checks the
/// lengths first (to say which number is wrong) and then what this loader adds: dtypes it
/// reads, ranks, the tensor count.
pub fn parse_header(file: &[u8]) -> Result<Header> {
    if file.len() < 8 {
        return Err(format_error(format!(
            "file is {} bytes; a safetensors file starts with an 8-byte header length",
            file.len()
        )));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&file[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    let available = (file.len() - 8) as u64;
    if header_len > MAX_HEADER_BYTES {
        return Err(format_error(format!(
            "header claims {header_len} bytes; the limit is {MAX_HEADER_BYTES}"
        )));
    }
    if header_len > available {
        return Err(format_error(format!(
            "header claims {header_len} bytes but only {available} follow (truncated file?)"
        )));
    }
    if header_len < 2 {
        return Err(format_error("header is empty; expected a JSON object"));
    }
    let data_start = 8 + header_len as usize;
    let (_, parsed) = SafeTensors::read_metadata(file)
        .map_err(|e| layout_error(e, &file[8..data_start], file.len() - data_start))?;
    let infos = parsed.tensors();
    if infos.len() > MAX_TENSORS {
        return Err(format_error(format!(
            "header lists {} tensors; the limit is {MAX_TENSORS}",
            infos.len()
        )));
    }
    let metadata: BTreeMap<String, String> = parsed
        .metadata()
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tensors = BTreeMap::new();
    for (name, info) in infos {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => Dtype::F32,
            safetensors::Dtype::F16 => Dtype::F16,
            safetensors::Dtype::BF16 => Dtype::BF16,
            other => {
                return Err(format_error(format!(
                    "tensor '{name}' has dtype {other:?}; supported dtypes are F32, F16 and BF16"
                )))
            }
        };
        if info.shape.len() > MAX_RANK {
            return Err(format_error(format!(
                "tensor '{name}' has rank {}; the limit is {MAX_RANK}",
                info.shape.len()
            )));
        }
        let (start, end) = info.data_offsets;
        let shape = info.shape.clone();
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape,
                start,
                end,
            },
        );
    }
    Ok(Header {
        metadata,
        tensors,
        data_start,
    })
}

/// What the `safetensors` crate rejected, said with the numbers that are wrong. `json` is the
/// header (already known to be well-formed when the layout is what failed).
fn layout_error(err: SafeTensorError, json: &[u8], data_len: usize) -> Error {
    match err {
        SafeTensorError::InvalidHeader(e) => {
            format_error(format!("header is not valid UTF-8: {e}"))
        }
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            format_error(format!("header is not valid JSON (or not a safetensors header): {e}"))
        }
        SafeTensorError::ValidationOverflow => format_error(
            "a tensor has an absurd shape: its element or byte count overflows".to_string(),
        ),
        SafeTensorError::InvalidOffset(name) => format_error(format!(
            "tensor '{name}' overlaps another or leaves a gap: data_offsets must tile the data section in order"
        )),
        SafeTensorError::TensorInvalidInfo => format_error(
            mismatched_tensor(json).unwrap_or_else(|| {
                "a tensor's data_offsets span another byte count than its shape and dtype give"
                    .to_string()
            }),
        ),
        SafeTensorError::MetadataIncompleteBuffer => format_error(format!(
            "the tensors' data_offsets do not end where the file does: the data section has {data_len} bytes"
        )),
        other => format_error(format!("invalid safetensors header: {other}")),
    }
}

/// Names the tensor whose byte span differs from its shape × dtype, for the message only.
fn mismatched_tensor(json: &[u8]) -> Option<String> {
    let Value::Object(entries) = serde_json::from_slice::<Value>(json).ok()? else {
        return None;
    };
    entries.iter().find_map(|(name, t)| {
        let dtype: safetensors::Dtype = serde_json::from_value(t.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(t.get("shape")?.clone()).ok()?;
        let [start, end]: [usize; 2] = serde_json::from_value(t.get("data_offsets")?.clone()).ok()?;
        let elements = shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d))?;
        let bytes = elements.checked_mul(dtype.bitsize())? / 8;
        (end.checked_sub(start)? != bytes).then(|| {
            format!(
                "tensor '{name}' has shape {shape:?} ({bytes} bytes as {dtype:?}) but its data spans {} bytes",
                end - start
            )
        })
    })
}

/// Elementwise nonlinearity after a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    Tanh,
    Sigmoid,
    /// Exact (erf) GELU, PyTorch's default.
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Activation> {
        match name.trim() {
            "none" | "identity" | "linear" => Ok(Activation::Identity),
            "relu" => Ok(Activation::Relu),
            "tanh" => Ok(Activation::Tanh),
            "sigmoid" => Ok(Activation::Sigmoid),
            "gelu" => Ok(Activation::Gelu),
            other => Err(format_error(format!(
                "unknown activation '{other}'; expected relu, tanh, sigmoid, gelu or none"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Identity => "none",
            Activation::Relu => "relu",
            Activation::Tanh => "tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Gelu => "gelu",
        }
    }
}

/// Index of a tensor in [`Weights`].
pub type TensorId = usize;

/// `y = act(x · Wᵀ + b)`, `W` stored `[outputs, inputs]` as in PyTorch's `nn.Linear`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenseSpec {
    pub weight: TensorId,
    pub bias: Option<TensorId>,
    pub inputs: usize,
    pub outputs: usize,
    pub activation: Activation,
}

/// One PyTorch LSTM layer, gates stacked `i, f, g, o`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LstmLayerSpec {
    pub weight_ih: TensorId,
    pub weight_hh: TensorId,
    pub bias_ih: Option<TensorId>,
    pub bias_hh: Option<TensorId>,
    pub inputs: usize,
    pub hidden: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Architecture {
    Mlp {
        dense: Vec<DenseSpec>,
    },
    /// LSTM layers over `sequence_length` steps, then the dense head on the last hidden state.
    Lstm {
        layers: Vec<LstmLayerSpec>,
        head: Vec<DenseSpec>,
    },
}

/// What a model computes and the sizes callers see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub arch: Architecture,
    /// Features per sample (MLP) or per time step (LSTM).
    pub input_size: usize,
    pub output_size: usize,
    /// Time steps per sample; 1 for an MLP.
    pub sequence_length: usize,
}

impl ModelSpec {
    pub fn arch_name(&self) -> &'static str {
        match self.arch {
            Architecture::Mlp { .. } => "mlp",
            Architecture::Lstm { .. } => "lstm",
        }
    }

    /// Floats in one sample of input.
    pub fn sample_len(&self) -> usize {
        self.input_size * self.sequence_length
    }
}

/// Resolves tensors by name into a spec, checking every shape against its neighbours.
struct Resolver<'h> {
    header: &'h Header,
    names: Vec<String>,
}

impl<'h> Resolver<'h> {
    fn take(&mut self, name: &str, rank: usize) -> Result<Option<(TensorId, &'h [usize])>> {
        let Some(info) = self.header.tensors.get(name) else {
            return Ok(None);
        };
        if info.shape.len() != rank {
            return Err(format_error(format!(
                "tensor '{name}' has shape {:?}; expected rank {rank}",
                info.shape
            )));
        }
        if info.shape.contains(&0) {
            return Err(format_error(format!(
                "tensor '{name}' has an empty dimension"
            )));
        }
        self.names.push(name.to_string());
        Ok(Some((self.names.len() - 1, &info.shape)))
    }

    fn require(&mut self, name: &str, rank: usize) -> Result<(TensorId, &'h [usize])> {
        self.take(name, rank)?
            .ok_or_else(|| format_error(format!("missing tensor '{name}'")))
    }

    fn bias(&mut self, name: &str, len: usize) -> Result<Option<TensorId>> {
        match self.take(name, 1)? {
            Some((id, shape)) if shape[0] == len => Ok(Some(id)),
            Some((_, shape)) => Err(format_error(format!(
                "tensor '{name}' has shape {shape:?}; expected [{len}]"
            ))),
            None => Ok(None),
        }
    }

    /// `dense.0`, `dense.1`, … chained from `inputs`.
    fn dense_stack(&mut self, inputs: usize, activations: Option<&str>) -> Result<Vec<DenseSpec>> {
        let mut layers = Vec::new();
        let mut width = inputs;
        while layers.len() < MAX_LAYERS {
            let i = layers.len();
            let Some((weight, shape)) = self.take(&format!("dense.{i}.weight"), 2)? else {
                break;
            };
            let (outputs, fan_in) = (shape[0], shape[1]);
            if fan_in != width {
                return Err(format_error(format!(
                    "tensor 'dense.{i}.weight' takes {fan_in} inputs but receives {width}"
                )));
            }
            let bias = self.bias(&format!("dense.{i}.bias"), outputs)?;
            layers.push(DenseSpec {
                weight,
                bias,
                inputs: width,
                outputs,
                activation: Activation::Identity,
            });
            width = outputs;
        }
        let count = layers.len();
        match activations {
            Some(list) => {
                let acts: Vec<&str> = list.split(',').collect();
                if acts.len() != count {
                    return Err(format_error(format!(
                        "__metadata__.activations lists {} activations for {count} dense layers",
                        acts.len()
                    )));
                }
                for (layer, name) in layers.iter_mut().zip(acts) {
                    layer.activation = Activation::parse(name)?;
                }
            }
            None => {
                for layer in layers.iter_mut().take(count.saturating_sub(1)) {
                    layer.activation = Activation::Relu;
                }
            }
        }
        Ok(layers)
    }
}

fn meta_size(header: &Header, key: &str) -> Result<Option<usize>> {
    match header.metadata.get(key) {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
            format_error(format!(
                "__metadata__.{key} is '{v}'; expected a whole number"
            ))
        }),
    }
}

/// Builds the spec from the header's `__metadata__` and tensor names. Returns the spec
/// and the tensor names in [`TensorId`] order. Every tensor in the file must be used.
pub fn model_spec(header: &Header) -> Result<(ModelSpec, Vec<String>)> {
    let mut r = Resolver {
        header,
        names: Vec::new(),
    };
    let activations = header.metadata.get("activations").map(String::as_str);
    let arch = header
        .metadata
        .get("arch")
        .ok_or_else(|| format_error("missing __metadata__.arch (expected \"mlp\" or \"lstm\")"))?;
    let spec = match arch.as_str() {
        "mlp" => {
            let input_size = header
                .tensors
                .get("dense.0.weight")
                .and_then(|t| t.shape.get(1).copied())
                .ok_or_else(|| {
                    format_error("missing tensor 'dense.0.weight' (shape [outputs, inputs])")
                })?;
            let dense = r.dense_stack(input_size, activations)?;
            let output_size = dense.last().map_or(input_size, |d| d.outputs);
            ModelSpec {
                arch: Architecture::Mlp { dense },
                input_size,
                output_size,
                sequence_length: 1,
            }
        }
        "lstm" => {
            let sequence_length = meta_size(header, "sequence_length")?
                .ok_or_else(|| format_error("lstm models need __metadata__.sequence_length"))?;
            if sequence_length == 0 || sequence_length > MAX_SEQUENCE_LENGTH {
                return Err(format_error(format!(
                    "__metadata__.sequence_length is {sequence_length}; expected 1..={MAX_SEQUENCE_LENGTH}"
                )));
            }
            let prefix = if header.tensors.contains_key("lstm.weight_ih_l0") {
                "lstm."
            } else {
                ""
            };
            let mut layers: Vec<LstmLayerSpec> = Vec::new();
            while layers.len() < MAX_LAYERS {
                let k = layers.len();
                let Some((weight_ih, ih)) = r.take(&format!("{prefix}weight_ih_l{k}"), 2)? else {
                    break;
                };
                let (gates, inputs) = (ih[0], ih[1]);
                if gates % 4 != 0 {
                    return Err(format_error(format!(
                        "tensor '{prefix}weight_ih_l{k}' has {gates} rows; expected 4 × hidden_size"
                    )));
                }
                let hidden = gates / 4;
                if let Some(prev) = layers.last() {
                    if inputs != prev.hidden {
                        return Err(format_error(format!(
                            "tensor '{prefix}weight_ih_l{k}' takes {inputs} inputs but layer {} has hidden size {}",
                            k - 1,
                            prev.hidden
                        )));
                    }
                }
                let (weight_hh, hh) = r.require(&format!("{prefix}weight_hh_l{k}"), 2)?;
                if hh != [gates, hidden] {
                    return Err(format_error(format!(
                        "tensor '{prefix}weight_hh_l{k}' has shape {hh:?}; expected [{gates}, {hidden}]"
                    )));
                }
                let bias_ih = r.bias(&format!("{prefix}bias_ih_l{k}"), gates)?;
                let bias_hh = r.bias(&format!("{prefix}bias_hh_l{k}"), gates)?;
                layers.push(LstmLayerSpec {
                    weight_ih,
                    weight_hh,
                    bias_ih,
                    bias_hh,
                    inputs,
                    hidden,
                });
            }
            let Some(first) = layers.first() else {
                return Err(format_error(format!(
                    "missing tensor '{prefix}weight_ih_l0'"
                )));
            };
            let input_size = first.inputs;
            let hidden = layers.last().map_or(0, |l| l.hidden);
            let head = r.dense_stack(hidden, activations)?;
            let output_size = head.last().map_or(hidden, |d| d.outputs);
            ModelSpec {
                arch: Architecture::Lstm { layers, head },
                input_size,
                output_size,
                sequence_length,
            }
        }
        other => {
            return Err(format_error(format!(
                "__metadata__.arch is '{other}'; supported architectures are mlp and lstm"
            )))
        }
    };
    for (key, actual) in [
        ("input_size", spec.input_size),
        ("output_size", spec.output_size),
    ] {
        if let Some(declared) = meta_size(header, key)? {
            if declared != actual {
                return Err(format_error(format!(
                    "__metadata__.{key} says {declared} but the weights give {actual}"
                )));
            }
        }
    }
    let used: BTreeSet<&str> = r.names.iter().map(String::as_str).collect();
    if let Some(extra) = header.tensors.keys().find(|n| !used.contains(n.as_str())) {
        return Err(format_error(format!(
            "unexpected tensor '{extra}' for a {} model",
            spec.arch_name()
        )));
    }
    let names = r.names;
    Ok((spec, names))
}

/// Where a model's weights live.
enum Storage {
    /// Borrowed from the file mapping: every tensor is F32, little-endian and 4-byte aligned.
    Mapped(Mmap),
    /// One owned buffer (copied from a Buffer, or converted from F16/BF16/unaligned data).
    Owned(Vec<f32>),
}

/// The weights of one model; tensors are addressed by [`TensorId`].
pub struct Weights {
    storage: Storage,
    /// Per tensor: byte offset into the mapping, or float offset into the owned buffer; and length.
    table: Vec<(usize, usize)>,
    bytes: usize,
}

impl Weights {
    pub fn tensor(&self, id: TensorId) -> &[f32] {
        let (offset, len) = self.table[id];
        match &self.storage {
            Storage::Owned(v) => &v[offset..offset + len],
            Storage::Mapped(map) => {
                let bytes = &map[offset..offset + len * 4];
                // SAFETY: `from_mapping` checked that every tensor is in bounds, 4-byte aligned and
                // little-endian F32 on a little-endian target; f32 has no invalid bit patterns.
                unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), len) }
            }
        }
    }

    /// Bytes of weight data (the tensors, not the header).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when the weights are read in place from the file mapping.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped(_))
    }

    pub fn tensor_count(&self) -> usize {
        self.table.len()
    }

    fn owned(file: &[u8], header: &Header, names: &[String]) -> Result<Weights> {
        let total: usize = names.iter().map(|n| header.tensors[n].elements()).sum();
        let mut data = Vec::new();
        data.try_reserve_exact(total).map_err(|_| {
            Error::new(
                ErrorCode::DeviceOutOfMemory,
                format!("cannot allocate {} bytes of weights", total * 4),
            )
        })?;
        let mut table = Vec::with_capacity(names.len());
        for name in names {
            let info = &header.tensors[name];
            let raw = &file[header.data_start + info.start..header.data_start + info.end];
            table.push((data.len(), info.elements()));
            match info.dtype {
                Dtype::F32 => data.extend(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
                ),
                Dtype::F16 => data.extend(
                    raw.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
                Dtype::BF16 => data.extend(
                    raw.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                ),
            }
        }
        Ok(Weights {
            storage: Storage::Owned(data),
            table,
            bytes: total * 4,
        })
    }

    fn from_mapping(map: Mmap, header: &Header, names: &[String]) -> Result<Weights> {
        let base = map.as_ptr() as usize;
        let zero_copy = cfg!(target_endian = "little")
            && names.iter().all(|n| {
                let info = &header.tensors[n];
                info.dtype == Dtype::F32
                    && (base + header.data_start + info.start).is_multiple_of(4)
            });
        if !zero_copy {
            return Weights::owned(&map, header, names);
        }
        let table: Vec<(usize, usize)> = names
            .iter()
            .map(|n| {
                let info = &header.tensors[n];
                (header.data_start + info.start, info.elements())
            })
            .collect();
        let bytes = table.iter().map(|(_, len)| len * 4).sum();
        Ok(Weights {
            storage: Storage::Mapped(map),
            table,
            bytes,
        })
    }
}

/// A parsed, validated model: what it computes and its weights.
pub struct ModelFile {
    pub spec: ModelSpec,
    pub weights: Weights,
}

impl ModelFile {
    /// Reads a model from bytes (a copy is made; the bytes can be dropped afterwards).
    pub fn from_bytes(bytes: &[u8]) -> Result<ModelFile> {
        let header = parse_header(bytes)?;
        let (spec, names) = model_spec(&header)?;
        let weights = Weights::owned(bytes, &header, &names)?;
        Ok(ModelFile { spec, weights })
    }

    /// Memory-maps a model file; aligned F32 weights are used in place.
    pub fn open(path: &Path) -> Result<ModelFile> {
        let file = File::open(path).map_err(|e| {
            Error::new(
                ErrorCode::ModelNotFound,
                format!("cannot open model file '{}': {e}", path.display()),
            )
        })?;
        let len = file
            .metadata()
            .map_err(|e| {
                Error::new(
                    ErrorCode::ModelNotFound,
                    format!("cannot stat '{}': {e}", path.display()),
                )
            })?
            .len();
        if len < 8 {
            return Err(format_error(format!(
                "'{}' is {len} bytes; too short for a safetensors file",
                path.display()
            )));
        }
        // SAFETY: the mapping is read-only; a model file must not be truncated while loaded
        // (documented in docs/model-format.md), as with every memory-mapped loader.
        let map = unsafe { Mmap::map(&file) }
            .map_err(|e| format_error(format!("cannot map '{}': {e}", path.display())))?;
        let header = parse_header(&map)?;
        let (spec, names) = model_spec(&header)?;
        let weights = Weights::from_mapping(map, &header, &names)?;
        Ok(ModelFile { spec, weights })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a safetensors file from `(name, shape, f32 data)` with the given metadata.
    pub(crate) fn write(
        meta: &[(&str, &str)],
        tensors: &[(&str, Vec<usize>, Vec<f32>)],
    ) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let m: serde_json::Map<String, Value> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        header.insert("__metadata__".into(), Value::Object(m));
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let start = data.len();
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let mut json = serde_json::to_vec(&Value::Object(header)).unwrap();
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.extend_from_slice(&data);
        out
    }

    /// A small seeded MLP: sizes `dims[0] → dims[1] → …`.
    pub(crate) fn mlp(dims: &[usize], activations: &str, seed: u64) -> Vec<u8> {
        let mut rng = seed;
        let mut next = move || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let mut tensors = Vec::new();
        let names: Vec<(String, String)> = (0..dims.len() - 1)
            .map(|i| (format!("dense.{i}.weight"), format!("dense.{i}.bias")))
            .collect();
        for (i, (w, b)) in names.iter().enumerate() {
            let (inp, out) = (dims[i], dims[i + 1]);
            tensors.push((
                w.as_str(),
                vec![out, inp],
                (0..out * inp).map(|_| next()).collect(),
            ));
            tensors.push((b.as_str(), vec![out], (0..out).map(|_| next()).collect()));
        }
        write(&[("arch", "mlp"), ("activations", activations)], &tensors)
    }

    fn code(r: Result<ModelFile>) -> ErrorCode {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.code,
        }
    }

    #[test]
    fn parses_a_valid_mlp() {
        let bytes = mlp(&[4, 8, 2], "relu,none", 1);
        let m = ModelFile::from_bytes(&bytes).unwrap();
        assert_eq!(m.spec.input_size, 4);
        assert_eq!(m.spec.output_size, 2);
        assert_eq!(m.weights.bytes(), (4 * 8 + 8 + 8 * 2 + 2) * 4);
        assert_eq!(m.weights.tensor_count(), 4);
    }

    #[test]
    fn rejects_headers_claiming_terabytes() {
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let err = ModelFile::from_bytes(&bytes).err().unwrap();
        assert_eq!(err.code, ErrorCode::ModelFormat);
        assert!(err.message.contains("header claims"), "{}", err.message);
    }

    #[test]
    fn rejects_truncation_at_every_length() {
        let bytes = mlp(&[4, 8, 2], "relu,none", 2);
        for len in 0..bytes.len() {
            assert_eq!(
                code(ModelFile::from_bytes(&bytes[..len])),
                ErrorCode::ModelFormat,
                "len {len}"
            );
        }
    }

    #[test]
    fn rejects_absurd_shapes_wrong_dtypes_and_overlaps() {
        let huge = write(&[("arch", "mlp")], &[]);
        let hdr = br#"{"__metadata__":{"arch":"mlp"},"dense.0.weight":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#;
        let mut absurd = (hdr.len() as u64).to_le_bytes().to_vec();
        absurd.extend_from_slice(hdr);
        absurd.extend_from_slice(&[0u8; 16]);
        let e = ModelFile::from_bytes(&absurd).err().unwrap();
        assert!(e.message.contains("absurd shape"), "{}", e.message);

        let hdr = br#"{"__metadata__":{"arch":"mlp"},"dense.0.weight":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
        let mut wrong = (hdr.len() as u64).to_le_bytes().to_vec();
        wrong.extend_from_slice(hdr);
        wrong.extend_from_slice(&[0u8; 16]);
        let e = ModelFile::from_bytes(&wrong).err().unwrap();
        assert!(e.message.contains("dtype I64"), "{}", e.message);

        let hdr = br#"{"__metadata__":{"arch":"mlp"},"dense.0.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"dense.0.bias":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let mut overlap = (hdr.len() as u64).to_le_bytes().to_vec();
        overlap.extend_from_slice(hdr);
        overlap.extend_from_slice(&[0u8; 8]);
        let e = ModelFile::from_bytes(&overlap).err().unwrap();
        assert!(e.message.contains("overlap"), "{}", e.message);

        assert_eq!(code(ModelFile::from_bytes(&huge)), ErrorCode::ModelFormat);
    }

    #[test]
    fn fuzzed_bytes_never_panic() {
        let good = mlp(&[3, 5, 2], "tanh,sigmoid", 3);
        let mut rng = 0x9e3779b97f4a7c15u64;
        for _ in 0..3000 {
            let mut b = good.clone();
            for _ in 0..4 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng as usize) % b.len();
                b[i] = (rng >> 32) as u8;
            }
            if let Ok(m) = ModelFile::from_bytes(&b) {
                assert!(m.spec.input_size > 0);
            }
        }
    }

    #[test]
    fn checks_layer_chaining_and_unknown_tensors() {
        let bad = write(
            &[("arch", "mlp")],
            &[
                ("dense.0.weight", vec![3, 2], vec![0.0; 6]),
                ("dense.1.weight", vec![1, 4], vec![0.0; 4]),
            ],
        );
        let e = ModelFile::from_bytes(&bad).err().unwrap();
        assert!(
            e.message.contains("takes 4 inputs but receives 3"),
            "{}",
            e.message
        );
        let extra = write(
            &[("arch", "mlp")],
            &[
                ("dense.0.weight", vec![1, 2], vec![0.0; 2]),
                ("stray", vec![1], vec![0.0]),
            ],
        );
        let e = ModelFile::from_bytes(&extra).err().unwrap();
        assert!(
            e.message.contains("unexpected tensor 'stray'"),
            "{}",
            e.message
        );
    }

    #[test]
    fn converts_f16_and_maps_aligned_files() {
        let hdr = br#"{"__metadata__":{"arch":"mlp","activations":"none"},"dense.0.weight":{"dtype":"F16","shape":[1,2],"data_offsets":[0,4]}}"#;
        let mut b = (hdr.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(hdr);
        b.extend_from_slice(&half::f16::from_f32(1.5).to_le_bytes());
        b.extend_from_slice(&half::f16::from_f32(-2.0).to_le_bytes());
        let m = ModelFile::from_bytes(&b).unwrap();
        assert_eq!(m.weights.tensor(0), &[1.5, -2.0]);

        let dir = std::env::temp_dir().join(format!("qm-format-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.safetensors");
        std::fs::write(&path, mlp(&[4, 8, 2], "relu,none", 4)).unwrap();
        let m = ModelFile::open(&path).unwrap();
        assert!(m.weights.is_mapped());
        let owned = ModelFile::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
        for id in 0..4 {
            assert_eq!(m.weights.tensor(id), owned.weights.tensor(id));
        }
        let missing = ModelFile::open(&dir.join("nope.safetensors"))
            .err()
            .unwrap();
        assert_eq!(missing.code, ErrorCode::ModelNotFound);
        std::fs::remove_dir_all(&dir).ok();
    }
}
