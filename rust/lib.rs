//! `embedpool._native`: the service's hot paths in Rust (tokenizing, batch planning, exact top-k,
//! the store's binary COPY stream).
//!
//! Each module holds a pure-Rust core plus thin Python wrappers; this file only registers them.

mod batching;
mod copy;
mod errors;
mod padding;
mod tokenize;
mod topk;

pub use batching::{plan, Budget};
pub use copy::{
    encode_copy, split_json_array, text_fits, vector_faults, First, Framing, Rows, VectorFault,
};
pub use errors::Error;
pub use padding::{pad_rows, round_up, Padded};
pub use tokenize::Encoder;
pub use topk::{top_k_cosine, Corpus, TopK};

#[pyo3::pymodule(gil_used = false)]
mod _native {
    #[pymodule_export]
    use crate::batching::plan_batches;
    #[pymodule_export]
    use crate::copy::{
        copy_binary, json_array_items, py_vector_faults, stack_vectors, text_faults,
    };
    #[pymodule_export]
    use crate::errors::{InputTooLongError, InternalError, NativeError};
    #[pymodule_export]
    use crate::padding::{pad_batch, pad_gather};
    #[pymodule_export]
    use crate::tokenize::Tokenizer;
    #[pymodule_export]
    use crate::topk::topk_cosine;
}
