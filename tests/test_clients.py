"""Downstream clients load an SLQ folder through sentence-transformers: LangChain and LlamaIndex.

Optional: each test skips with the reason when its client is absent (`pip install "slq_hf[clients]"`; CI runs this
file in its own venv, see `make test-clients`). The reference for every number is SLQModel.encode on the same
folder, the simpler path the clients must agree with.

What each client passes through (checked below):
- LangChain `HuggingFaceEmbeddings` (langchain-huggingface): texts only by its API (`embed_documents`, `embed_query`,
  newlines replaced by spaces first); a string naming an existing image file reaches SLQ as that image.
- LlamaIndex `HuggingFaceEmbedding` (llama-index-embeddings-huggingface): texts (`get_text_embedding(_batch)`,
  `get_query_embedding`) and images by file path (`get_image_embedding(_batch)`); BytesIO images are refused by
  sentence-transformers' input check ("Unsupported input type: BytesIO").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from slq_hf import SLQModel

TEXTS = ["a red square on a grey background", "a blue circle", "a green\ntriangle in the corner"]
INSTALL = 'install the optional clients with `pip install "slq_hf[clients]"` (CI: make test-clients)'


@pytest.fixture(scope="module")
def slq_folder(tiny_backbone_path, tmp_path_factory) -> Path:
    """A saved SLQ folder on the tiny Qwen3-VL backbone, plus two image files next to it."""
    out = tmp_path_factory.mktemp("slq_clients")
    torch.manual_seed(0)
    model = SLQModel.from_backbone(tiny_backbone_path("qwen3_vl"), num_queries=4)
    # A "query" set different from the default one: sentence-transformers' task="query" selects it.
    model.add_query_set("query", queries=torch.randn(4, model.config.hidden_size) * 0.02)
    model.save_pretrained(out / "slq")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out / "red.png")
    Image.new("RGB", (40, 56), (20, 30, 220)).save(out / "blue image.jpg")  # space in the name on purpose
    return out


@pytest.fixture(scope="module")
def reference(slq_folder):
    """SLQModel.encode on the folder: callable(list of inputs, query set name) -> (N, D) float32."""
    model = SLQModel.from_pretrained(slq_folder / "slq").eval()

    def encode(inputs: list, query_set: str = "default") -> torch.Tensor:
        with model.use_query_set(query_set):
            return model.encode(inputs)

    return encode


def images(slq_folder: Path) -> list[Path]:
    return [slq_folder / "red.png", slq_folder / "blue image.jpg"]


def as_tensor(vectors) -> torch.Tensor:
    return torch.tensor(vectors, dtype=torch.float32)


# --- LangChain ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def langchain_embeddings(request):
    langchain_huggingface = pytest.importorskip("langchain_huggingface", reason=f"langchain-huggingface: {INSTALL}")
    slq_folder = request.getfixturevalue("slq_folder")  # only after the import check: skipping costs no build
    return langchain_huggingface.HuggingFaceEmbeddings(
        model_name=str(slq_folder / "slq"), model_kwargs={"trust_remote_code": True, "device": "cpu"})


def test_langchain_embeds_documents_and_queries(langchain_embeddings, reference):
    documents = as_tensor(langchain_embeddings.embed_documents(TEXTS))
    expected = reference([text.replace("\n", " ") for text in TEXTS])  # LangChain flattens newlines first
    assert documents.shape == expected.shape
    torch.testing.assert_close(documents, expected, atol=1e-5, rtol=0)
    query = as_tensor(langchain_embeddings.embed_query(TEXTS[1]))
    torch.testing.assert_close(query, expected[1], atol=1e-5, rtol=0)


def test_langchain_task_kwargs_select_the_query_set(langchain_embeddings, reference, slq_folder):
    """encode_kwargs / query_encode_kwargs reach SLQ: {"task": "query"} uses the folder's "query" set."""
    langchain_huggingface = pytest.importorskip("langchain_huggingface")
    embeddings = langchain_huggingface.HuggingFaceEmbeddings(
        model_name=str(slq_folder / "slq"), model_kwargs={"trust_remote_code": True, "device": "cpu"},
        query_encode_kwargs={"task": "query"}, encode_kwargs={"task": "document"})
    query = as_tensor(embeddings.embed_query(TEXTS[0]))
    torch.testing.assert_close(query, reference(TEXTS[:1], "query")[0], atol=1e-5, rtol=0)
    assert (query - reference(TEXTS[:1])[0]).abs().max() > 1e-3  # the sets really differ
    # no "document" set in the folder: documents use the default set
    torch.testing.assert_close(as_tensor(embeddings.embed_documents(TEXTS[:1])), reference(TEXTS[:1]),
                               atol=1e-5, rtol=0)


def test_langchain_image_paths_embed_as_images(langchain_embeddings, reference, slq_folder):
    paths = images(slq_folder)
    got = as_tensor(langchain_embeddings.embed_documents([str(p) for p in paths]))
    expected = reference(paths)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and not as the text of the path
    assert (got - reference([{"text": str(p)} for p in paths])).abs().max() > 1e-3


def test_langchain_vector_store_finds_each_document(langchain_embeddings):
    vectorstores = pytest.importorskip("langchain_core.vectorstores", reason=f"langchain-core: {INSTALL}")
    store = vectorstores.InMemoryVectorStore.from_texts(TEXTS, langchain_embeddings,
                                                        metadatas=[{"i": i} for i in range(len(TEXTS))])
    for i, text in enumerate(TEXTS):
        (hit,) = store.similarity_search(text.replace("\n", " "), k=1)
        assert hit.metadata["i"] == i


# --- LlamaIndex -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_embeddings(request):
    module = pytest.importorskip("llama_index.embeddings.huggingface",
                                 reason=f"llama-index-embeddings-huggingface: {INSTALL}")
    slq_folder = request.getfixturevalue("slq_folder")
    return module.HuggingFaceEmbedding(model_name=str(slq_folder / "slq"), trust_remote_code=True, device="cpu")


def test_llama_index_embeds_texts_and_queries(llama_embeddings, reference):
    expected = reference(TEXTS)
    torch.testing.assert_close(as_tensor(llama_embeddings.get_text_embedding_batch(TEXTS)), expected,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(as_tensor(llama_embeddings.get_text_embedding(TEXTS[2])), expected[2],
                               atol=1e-5, rtol=0)
    # LlamaIndex's "query" is a prompt name (an empty prompt here), not a task: the default set embeds queries.
    torch.testing.assert_close(as_tensor(llama_embeddings.get_query_embedding(TEXTS[0])), expected[0],
                               atol=1e-5, rtol=0)


def test_llama_index_embeds_images(llama_embeddings, reference, slq_folder):
    paths = images(slq_folder)
    expected = reference(paths)
    torch.testing.assert_close(as_tensor(llama_embeddings.get_image_embedding(str(paths[1]))), expected[1],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(as_tensor(llama_embeddings.get_image_embedding_batch([str(p) for p in paths])),
                               expected, atol=1e-5, rtol=0)


def test_llama_index_vector_index_retrieves_each_node(llama_embeddings):
    core = pytest.importorskip("llama_index.core", reason=f"llama-index-core: {INSTALL}")
    from llama_index.core.schema import TextNode

    # Nodes given directly: no text splitter (its tokenizer would be downloaded on first use).
    nodes = [TextNode(text=text, id_=f"n{i}") for i, text in enumerate(TEXTS)]
    index = core.VectorStoreIndex(nodes, embed_model=llama_embeddings)
    retriever = index.as_retriever(similarity_top_k=1)
    for i, text in enumerate(TEXTS):
        (hit,) = retriever.retrieve(text)
        assert hit.node.node_id == f"n{i}"
