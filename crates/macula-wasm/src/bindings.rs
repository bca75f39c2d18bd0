//! Rust bindings of world `macula:mesh/workload` (`wit/mesh.wit`), generated
//! by wasmtime: every host function is async (publish, call and KV wait on
//! the mesh), and so is every export.

wasmtime::component::bindgen!({
    world: "workload",
    path: "wit",
    imports: { default: async },
    exports: { default: async },
});
