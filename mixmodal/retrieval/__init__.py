"""Retrieval augmentation (CM3Leon / RA-CM3): a dual encoder, a FAISS memory bank, selection.

    encoder.py   DualEncoder (CLIP-style text and image towers), its loss and tokenization
    document_embedder.py
                 the encoder on disk (save_dual_encoder), DocumentEmbedder: documents ->
                 normalised embeddings (the mean of text and image embeddings, CM3Leon §2.1)
    bank.py      MemoryBank: a FAISS inner-product index + a document store + the encoder's
                 fingerprint; build / open (checked) / add / reindex / search; bank.json
    store.py     the bank's document store: documents.jsonl + offsets + PNGs + content keys;
                 its writer, random access (cached), document_key
    index.py     the bank's FAISS index: flat / ivf / hnsw, search parameters, reading it checked
    embed.py     the embedder at the bank's boundary: loading one, checking what it returns
    errors.py    BankError (exported by bank.py)
    select.py    CM3Leon's selection: relevance, modality, diversity, query dropout, never self;
                 Retriever (bank + embedder + selection) used by training and generation

Training the dual encoder is the `dual-encoder` task of `mixmodal train`
(mixmodal/train/dual_encoder.py); retrieval-augmented training is `data.retrieval` of the
`fusion` task (mixmodal/data/pipeline.py); generation is `mixmodal generate --retrieve K --index DIR`.
"""
