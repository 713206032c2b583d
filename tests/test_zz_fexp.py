import base64, io, json, time
from pathlib import Path
import yaml
from PIL import Image
from worker_process import *

def small_jpeg(path, side=64):
    im = Image.open(path).convert("RGB"); im.thumbnail((side, side))
    b = io.BytesIO(); im.save(b, format="JPEG", quality=80); return base64.b64encode(b.getvalue()).decode()

def test_throughput(broker, new_topic, unique_id, worker_env, sample_photos, tmp_path):
    req, lab, emb, dlq = new_topic(4), new_topic(4), new_topic(4), new_topic(1)
    tax = tmp_path / "t.yaml"; tax.write_text(yaml.safe_dump({"name": "x", "templates": ["a photo of a {}."], "classes": ["dog", "cat", "flower"]}))
    imgs = [small_jpeg(p) for p in sample_photos[:6]]
    N = 2000
    prod = produce(broker.bootstrap, req, ((i % 4, f"id{i}".encode(), json.dumps({"id": f"id{i}", "image": {"base64": imgs[i % 6]}}).encode()) for i in range(N)))
    env = worker_env(LABELSTREAM_TOPICS__REQUESTS=req, LABELSTREAM_TOPICS__LABELS=lab, LABELSTREAM_TOPICS__EMBEDDINGS=emb, LABELSTREAM_TOPICS__DLQ=dlq,
                     LABELSTREAM_KAFKA__GROUP_ID=f"g{unique_id}", LABELSTREAM_TAXONOMY__PATH=str(tax), LABELSTREAM_TAXONOMY__FEED_ENABLED="false",
                     LABELSTREAM_WORKER__MAX_IN_FLIGHT="64", LABELSTREAM_WORKER__COMMIT_INTERVAL_MS="50")
    t0 = time.monotonic()
    w = start_worker(env, tmp_path, "w")
    col = OutputCollector(broker.bootstrap, lab)
    try:
        w.wait_for_event("partitions_assigned", 60)
        t1 = time.monotonic()
        ok = col.read_until(lambda r: len(r) >= N, 200, w.assert_alive)
        t2 = time.monotonic()
        print("startup", t1 - t0, "process", t2 - t1, ok, len(col.records))
        print(w.stop())
    finally:
        w.kill(); col.close()
