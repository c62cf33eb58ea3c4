//! What a NATS client (async-nats, not kiln) sees of kiln's buckets: the `kiln-blobs` object
//! store and the `kiln-stages` KV bucket, read, listed and damaged as a test needs. The oracle
//! for "a record never names a blob that is not there".

/// What a NATS client (not kiln) sees of kiln's buckets.
pub struct Nats {
    rt: tokio::runtime::Runtime,
    js: async_nats::jetstream::Context,
}

impl Nats {
    pub fn connect(url: &str) -> Nats {
        let rt = super::rt();
        let js = rt.block_on(async {
            async_nats::jetstream::new(async_nats::connect(url).await.unwrap())
        });
        Nats { rt, js }
    }

    pub fn has_object(&self, digest: &str) -> bool {
        self.rt.block_on(async {
            let store = self.js.get_object_store("kiln-blobs").await.unwrap();
            // A deleted object keeps its info, marked deleted.
            store.info(digest).await.is_ok_and(|i| !i.deleted)
        })
    }

    pub fn delete_object(&self, digest: &str) {
        self.rt.block_on(async {
            let store = self.js.get_object_store("kiln-blobs").await.unwrap();
            store.delete(digest).await.unwrap();
        })
    }

    /// The keys of the `kiln-stages` KV bucket.
    pub fn stage_keys(&self) -> Vec<String> {
        use futures::StreamExt;
        self.rt.block_on(async {
            let kv = self.js.get_key_value("kiln-stages").await.unwrap();
            let mut keys = kv.keys().await.unwrap();
            let mut out = Vec::new();
            while let Some(k) = keys.next().await {
                out.push(k.unwrap());
            }
            out
        })
    }

    /// Every record of the `kiln-stages` KV bucket: key and JSON value.
    pub fn stage_records(&self) -> Vec<(String, serde_json::Value)> {
        let keys = self.stage_keys();
        self.rt.block_on(async {
            let kv = self.js.get_key_value("kiln-stages").await.unwrap();
            let mut out = Vec::new();
            for key in keys {
                if let Some(value) = kv.get(&key).await.unwrap() {
                    out.push((key, serde_json::from_slice(&value).unwrap()));
                }
            }
            out
        })
    }

    pub fn stream_exists(&self, name: &str) -> bool {
        self.rt
            .block_on(async { self.js.get_stream(name).await.is_ok() })
    }

    pub fn delete_stream(&self, name: &str) {
        self.rt
            .block_on(async { self.js.delete_stream(name).await.unwrap() });
    }
}
