"""A load test of app.py over real HTTP on 127.0.0.1: latency, throughput, errors, memory, and no cross-talk.

Clients speak Gradio's REST API (`/gradio_api/upload`, `/gradio_api/call/<endpoint>`), as any program may: upload the
image, ask for `/classify` (top-k and Grad-CAM) or `/mistakes` (the misclassified gallery), read the answer's event
stream, and fetch the pictures it names. Each of the concurrent clients has its own image, layer and class, and every
answer is compared with the one the same request got alone, before the load: a Grad-CAM that crossed requests would
show up as a different picture.
"""
import io, json, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder
from cli import quiet_warnings  # noqa: E402
quiet_warnings()  # before fastai's import (below), which warns while it is imported

import numpy as np
from fastcore.script import call_parse

from app import LAYERS, PREDICTED, serving


class AppError(Exception): "The app answered a request with an error; its message."


class Api:
    "Gradio's REST API of one running app.py, for one client (its own HTTP connection)."
    def __init__(self, url):
        import httpx
        self.http = httpx.Client(base_url=url, timeout=600)

    def upload(self, file):
        "Upload `file`; its FileData, as an endpoint takes it."
        r = self.http.post('gradio_api/upload', files={'files': (Path(file).name, Path(file).read_bytes())})
        if r.status_code != 200: raise AppError(f'upload: HTTP {r.status_code} {r.text[:200]}')
        return {'path': r.json()[0], 'orig_name': Path(file).name, 'meta': {'_type': 'gradio.FileData'}}

    def call(self, endpoint, *data):
        "The outputs of `/endpoint` for inputs `data`, read from the event stream; `AppError` with the app's message."
        r = self.http.post(f'gradio_api/call/{endpoint}', json={'data': list(data)})
        if r.status_code != 200: raise AppError(f'{endpoint}: HTTP {r.status_code} {r.text[:200]}')
        event = None
        with self.http.stream('GET', f'gradio_api/call/{endpoint}/{r.json()["event_id"]}') as stream:
            for line in stream.iter_lines():
                if line.startswith('event: '): event = line[7:]
                elif line.startswith('data: ') and event in ('complete', 'error'):
                    out = json.loads(line[6:])
                    if event == 'error':  # Gradio's {"error": message, ...}: the text of a gr.Error
                        raise AppError(out.get('error') if isinstance(out, dict) else str(out))
                    return out
        raise AppError(f'{endpoint}: the event stream ended without an answer')

    def picture(self, item):
        "A gallery item's picture, fetched from the app, as an array."
        from PIL import Image
        r = self.http.get(item['image']['url'])
        if r.status_code != 200: raise AppError(f'picture: HTTP {r.status_code}')
        return np.asarray(Image.open(io.BytesIO(r.content)))


def classify(api, image, layer, target, k=3):
    "One classify request as a user's program makes it: (top-k (label, prob) pairs, the Grad-CAM picture)."
    labels, gallery, _ = api.call('classify', [api.upload(image)], k, layer, target, 0.5)
    return [(c['label'], c['confidence']) for c in labels['confidences']], api.picture(gallery[0])


def mistakes(api, n, layer):
    "One misclassified-gallery request: [(caption, picture)]."
    [gallery] = api.call('mistakes', n, layer, 0.5)
    return [(item['caption'], api.picture(item)) for item in gallery]


def same(a, b):
    "Whether two answers agree: the same classes with probabilities within 1e-5, pictures equal to one grey level."
    def flat(x):
        if isinstance(x, np.ndarray): return [x]
        if isinstance(x, (list, tuple)): return [y for v in x for y in flat(v)]
        return [x]
    fa, fb = flat(a), flat(b)
    if len(fa) != len(fb): return False
    for x, y in zip(fa, fb):
        if isinstance(x, np.ndarray):
            if x.shape != y.shape or np.abs(x.astype(int) - y.astype(int)).max() > 1: return False
        elif isinstance(x, float):
            if abs(x - y) > 1e-5: return False
        elif x != y: return False
    return True


def rss_mb(pid):
    "The resident memory of process `pid`, in MB (Linux)."
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024
    return float('nan')


def summary(seconds):
    "p50, p95 and max of a list of latencies in seconds, in ms."
    ms = np.array(seconds) * 1000
    return {'n': len(ms), 'p50_ms': round(float(np.percentile(ms, 50)), 1),
            'p95_ms': round(float(np.percentile(ms, 95)), 1),
            'max_ms': round(float(ms.max()), 1)} if len(ms) else {'n': 0}


def hammer(url, jobs, requests, work, refs):
    "Each job in its own client thread, `requests` times, all at once: latencies, wall time, errors and mismatches."
    def client(i):
        api, lat, errors, wrong = Api(url), [], [], 0
        for _ in range(requests):
            t = time.perf_counter()
            try: answer = work(api, *jobs[i])
            except Exception as e: errors.append(f'{type(e).__name__}: {e}'); continue
            lat.append(time.perf_counter() - t)
            wrong += not same(answer, refs[i])
        return lat, errors, wrong
    t = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool: results = list(pool.map(client, range(len(jobs))))
    wall = time.perf_counter() - t
    lat = [x for r in results for x in r[0]]
    errors = [e for r in results for e in r[1]]
    return {**summary(lat), 'clients': len(jobs), 'requests_each': requests, 'wall_s': round(wall, 2),
            'per_s': round(len(lat) / wall, 2), 'errors': len(errors), 'first_errors': errors[:3],
            'different_from_alone': sum(r[2] for r in results)}


def load_test(run, clients=8, requests=25, gallery=5, gallery_n=10, rounds=1, args=(), log=None, say=print):
    "Start app.py for `run` and put it under load; returns the numbers (see the module's docstring)."
    run = Path(run)
    examples = sorted((run / 'examples').glob('*.png'))
    classes = json.loads((run / 'config.json').read_text())['classes']
    if not examples: raise SystemExit(f'app_load.py: {run} has no examples/ to send')
    # Client i: its own image, layer and Grad-CAM class.
    jobs = [(examples[i % len(examples)], LAYERS[i % len(LAYERS)], classes[(3 * i + 1) % len(classes)])
            for i in range(clients)]
    out = {'run': str(run), 'clients': clients}
    with serving(run, log=log, args=args) as server:
        out['startup_s'] = round(server.startup_s, 2)
        say(f'app.py answered {out["startup_s"]} s after it was started')
        pid, api = server.proc.pid, Api(server.url)
        rss = lambda: round(rss_mb(pid), 1)
        out['rss_start_mb'] = rss()
        one = (examples[0], 'layer3', PREDICTED)
        for _ in range(3): classify(api, *one)  # warm: the first calls build oneDNN's kernels
        alone = []
        for _ in range(requests):
            t = time.perf_counter(); classify(api, *one); alone.append(time.perf_counter() - t)
        out['classify_alone'] = summary(alone)
        say(f'one client, one image with Grad-CAM, {requests} requests in a row: '
            f'p50 {out["classify_alone"]["p50_ms"]} ms, '
            f'p95 {out["classify_alone"]["p95_ms"]} ms (upload, answer and picture fetched)')
        refs = [classify(api, *job) for job in jobs]  # each request alone: what the loaded server must answer
        out['rss_before_load_mb'] = rss()
        say(f'server memory: {out["rss_start_mb"]} MB when it first answered, '
            f'{out["rss_before_load_mb"]} MB before the load')
        out['classify_load'], out['rss_after_classify_mb'] = [], []
        for r in range(rounds):  # the first round also warms the server's threads: its memory is the cold start's
            out['classify_load'].append(hammer(server.url, jobs, requests, classify, refs))
            out['rss_after_classify_mb'].append(rss())
            c = out['classify_load'][-1]
            say(f'{clients} clients × {requests} classify requests at once{f" (round {r + 1})" if rounds > 1 else ""}: '
                f'p50 {c["p50_ms"]} ms, p95 {c["p95_ms"]} ms, {c["per_s"]} requests/s, {c["errors"]} errors, '
                f'{c["different_from_alone"]} answers different from alone; '
                f'server memory {out["rss_after_classify_mb"][-1]} MB')
        if gallery:
            t = time.perf_counter()
            # The first reads the run's mistakes.npz (already loaded at start), or, for a run made before runs kept
            # it, the test set, with one pass over it.
            mistakes(api, gallery_n, 'layer3')
            out['first_mistakes_s'] = round(time.perf_counter() - t, 2)
            out['rss_after_test_set_mb'] = rss()
            kept = 'from mistakes.npz' if (run / 'mistakes.npz').exists() else 'reads the test set'
            say(f'first misclassified-gallery request ({kept}): {out["first_mistakes_s"]} s; '
                f'server memory {out["rss_after_test_set_mb"]} MB')
            gjobs = [(gallery_n, LAYERS[i % len(LAYERS)]) for i in range(clients)]
            grefs = [mistakes(api, *job) for job in gjobs]
            out['mistakes_load'], out['rss_after_mistakes_mb'] = [], []
            for r in range(rounds):
                out['mistakes_load'].append(hammer(server.url, gjobs, gallery, mistakes, grefs))
                out['rss_after_mistakes_mb'].append(rss())
                g = out['mistakes_load'][-1]
                say(f'{clients} clients × {gallery} gallery requests of {gallery_n} at once'
                    f'{f" (round {r + 1})" if rounds > 1 else ""}: p50 {g["p50_ms"]} ms, p95 {g["p95_ms"]} ms, '
                    f'{g["per_s"]} requests/s, {g["errors"]} errors, {g["different_from_alone"]} answers different '
                    f'from alone; server memory {out["rss_after_mistakes_mb"][-1]} MB')
        grow = lambda a, b: f'{b - a:+.1f} MB'
        c = out['rss_after_classify_mb']
        say(f'server memory growth: classify load {grow(out["rss_before_load_mb"], c[-1])} in all, '
            f'{grow(c[0], c[-1])} after its first round'
            + (f'; gallery load {grow(out["rss_after_test_set_mb"], out["rss_after_mistakes_mb"][-1])}, '
               f'after reading the test set (once, {grow(c[-1], out["rss_after_test_set_mb"])})' if gallery else ''))
    return out


@call_parse
def main(run: str = 'results/cpu-bf16-seed0',  # run folder to serve
         clients: int = 8,                     # concurrent clients
         requests: int = 25,                   # classify requests per client
         gallery: int = 5,                     # misclassified-gallery requests per client (0: none)
         rounds: int = 1,                      # times each load is repeated, memory read after each
         data: str = None,                     # CIFAR folder with the run's test images (for the gallery)
         out: str = None):                     # also write the numbers as JSON here
    "Serve `run` with app.py on 127.0.0.1 and load it with concurrent clients over HTTP; print and save the numbers."
    import torch
    from precision import device_name
    for flag, v, least in (('clients', clients, 1), ('requests', requests, 1), ('gallery', gallery, 0),
                           ('rounds', rounds, 1)):
        if v < least: raise SystemExit(f'app_load.py: error: --{flag} must be at least {least}, got {v}')
    say = lambda s: print(s, flush=True)
    say(f'$ python experiments/app_load.py {" ".join(sys.argv[1:])}')
    say(f'{device_name("cpu")}; torch {torch.__version__}, {torch.get_num_threads()} threads')
    numbers = load_test(run, clients, requests, gallery, rounds=rounds, args=('--data', data) if data else (), say=say,
                        log=Path(out).with_suffix('.app.log') if out else None)
    if out: Path(out).write_text(json.dumps(numbers, indent=1) + '\n')
