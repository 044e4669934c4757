"""A web app for a run: top-k classes and Grad-CAM of any image, the test set's mistakes. `python app.py --run DIR`."""
import math, os, socket, subprocess, sys, threading, time, urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # the checkout is the suite: its modules first, from any folder

from fastcore.script import call_parse, store_true

from cli import UsageError, quiet_warnings, user_errors

LAYERS = ('prep', 'layer1', 'layer2', 'layer3')  # arch.BLOCKS, coarsest last; listed here so --help needs no torch
PREDICTED = 'the predicted class'
SCALE = 8  # 32×32 pictures shown at 256×256, pixels kept square
MAX_MISTAKES = 50  # the most misclassified test images the gallery shows: as many as a run keeps (interpret.MISTAKES)


# A public server's limits (flags of `main`): what one request may cost is bounded before any work starts.
MAX_FILE_MB = 10                 # per uploaded file; Gradio refuses a bigger upload before it is stored
MAX_IMAGES = 16                  # per classify request
MAX_PIXELS = 4096 * 4096         # per image, checked from its header, before its pixels are decoded
CONCURRENCY = 4                  # requests run at once; Grad-CAM is safe on a shared model (cams.gradcam)
QUEUE = 64                       # requests waiting beyond those; the next is told the queue is full
# Gradio keeps a copy of the page's state for each session, and every API call is a session of its own: 10,000 by
# default, some 60 kB each in RSS. The app keeps no state between requests, so a few hundred are plenty.
SESSIONS = 200
# Gradio's Label rounds each bar's percentage to a whole number, so 99.96% reads "100%": its bars keep the class names
# and lengths, and the numbers shown are the table's beside them, cut to one decimal (`percent`).
CSS = '#prediction .confidence { display: none; }'


def load(run=None, data=None, device='cpu', max_file_mb=MAX_FILE_MB, max_images=MAX_IMAGES, max_pixels=MAX_PIXELS,
         tta=False):
    "What the app needs to start: the run's model, classes, headline, examples and kept mistakes; no data set."
    from run_folder import find_run, load_model, load_mistakes
    from report import headline
    run = find_run(run)  # one line and exit 2 for a bad --run, before any server starts
    for f in ('metrics.csv',):
        if not (run / f).exists(): raise UsageError(f'run folder {run} has no {f}; did its training finish?')
    model, classes = load_model(run, device, data)
    # run.py saves ten test images in the run folder, so classifying needs nothing else; the misclassified gallery
    # reads the run's mistakes.npz, or for a run made before runs kept it, the test set (`mistakes_interp`).
    examples = [str(p) for p in sorted((run / 'examples').glob('*.png'))]
    # The misclassified gallery from what the run kept (mistakes.npz, under 1 MB): no data set, no pass over it.
    interp, worst = load_mistakes(run) or (None, None)
    return SimpleNamespace(run=run, model=model, classes=classes, headline=headline(run), examples=examples,
                           examples_dir=str(run / 'examples'), data=data, device=device, max_file_mb=max_file_mb,
                           max_images=max_images, max_pixels=max_pixels, tta=tta, interp=interp, worst=worst,
                           lock=threading.Lock())


def percent(p):
    "A probability as a percentage with one decimal, cut, not rounded: 0.9996 is 99.9%, never a sure-looking 100%."
    return f'{math.floor(round(p * 1000, 6)) / 10:.1f}%'  # round(…, 6) first: 0.123 * 1000 is 122.99999999999999


def refused(message):
    "The error a request gets for `message`, shown in the page; the server's log gets one line, not a traceback."
    import gradio as gr
    # Gradio prints the traceback of every gr.Error it raises: on a public server, one for each bad upload.
    print(f'app.py: refused a request: {message}', file=sys.stderr, flush=True)
    return gr.Error(message, print_exception=False)


def classify(st, files, k, layer, target, opacity):
    "Top-k classes of each uploaded image, each image with its Grad-CAM: (first image's label dict, gallery, table)."
    from cams import cam_overlay, view_cam
    from predict import network_view, predict, read_image
    if not files: return {}, [], ''
    # Gradio sends paths (str); older Gradio and a Python caller may send tempfile-like objects or Paths.
    paths = [Path(f) if isinstance(f, (str, os.PathLike)) else Path(f.name)
             for f in (files if isinstance(files, list) else [files])]
    # A program may send what the page's widgets can't; Gradio refuses a value outside a slider's range or a
    # radio's or dropdown's choices before this runs. The number of files is for us to check.
    if len(paths) > st.max_images:
        raise refused(f'{len(paths)} images in one request; the limit is {st.max_images}: send them in smaller groups')
    views = []
    for p in paths:  # all read first, with predict.read_image's one-line reason for a broken file
        try: views.append(network_view(read_image(p, st.max_pixels)))
        except UsageError as e: raise refused(str(e).replace(str(p), p.name)) from None  # not Gradio's temp path
    labels, gallery, rows = None, [], ['| image | ' + ' | '.join(f'#{i + 1}' for i in range(int(k))) + ' |',
                                       '|---' * (int(k) + 1) + '|']
    for path, view in zip(paths, views):
        top = predict(st.model, view, st.classes, k=int(k), tta=st.tta)
        labels = labels or {p.label: p.prob for p in top}
        rows.append(f'| {path.name} | ' + ' | '.join(f'{p.label} {percent(p.prob)}' for p in top) + ' |')
        cls = top[0].label if target == PREDICTED else target
        cam = view_cam(st.model, view, layer, st.classes.index(cls)) if opacity > 0 else None
        gallery.append((cam_overlay(view, cam, opacity, SCALE), f'{path.name}: Grad-CAM of {cls} at {layer}'
                        if cam is not None else f'{path.name}: as the network sees it'))
    return labels, gallery, '\n'.join(rows)


def mistakes_interp(st):
    "The run's test-set predictions and the inputs of its worst 50 mistakes: its mistakes.npz, else made on first use."
    with st.lock:  # a Learner is not for several threads, and one pass over the test set is enough
        if st.interp is None:  # a run made before runs kept mistakes.npz (see `load`): the test set, once
            from run_folder import load_run, run_data
            from interpret import interpret, kept_mistakes
            # Batches of 128, not the run's 512: in eval mode each image's answer is the same, and the pass's peak
            # memory (which the process keeps afterwards) is a quarter.
            try: interp = interpret(load_run(st.run, run_data(st.run, st.data), st.device, bs=128))
            except UsageError as e:
                raise refused(f'the misclassified test images need the test set: {e}; '
                              'start the app with --data DIR') from None
            # What the gallery reads of it, as a run's mistakes.npz holds it: the inputs of the MAX_MISTAKES worst now,
            # so that no request runs the Learner again, which can go with its 60,000 images.
            st.interp, _, st.worst = kept_mistakes(interp, MAX_MISTAKES)
    return st.interp, st.worst


def mistakes(st, n, layer, opacity):
    "The `n` highest-loss misclassified test images, each with its predicted class's Grad-CAM at `layer`."
    from cams import cam_overlay, misclassified_cams
    interp, worst = mistakes_interp(st)
    return [(cam_overlay(img, cam, opacity, SCALE), caption)
            for img, cam, caption in misclassified_cams(st.model, interp, int(n), layer, x=worst)]


def atomic_image_cache():
    "Make Gradio write the pictures it sends under a temporary name and rename them into place."
    # Gradio (6.31) saves a returned image to its cache at a path named by the image's hash, rewriting the file in
    # place each time. Two requests that return the same picture at once (two users asking for the misclassified
    # gallery) then race: one rewrites the file while the other's client is being sent it, which arrives cut short
    # ("Too little data for declared Content-Length", seen in experiments/app_load.py). Gradio's own copy of a
    # file (save_file_to_cache) already writes aside and renames; this does the same for images.
    import tempfile
    from gradio import processing_utils as pu
    if getattr(pu.save_pil_to_cache, 'atomic', False): return
    def save_pil_to_cache(img, cache_dir, name='image', format='webp'):
        data = pu.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / pu.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=f'.{name}.')
        with os.fdopen(fd, 'wb') as f: f.write(data)
        os.replace(staging, folder / f'{name}.{format}')  # readers see the old file or the new one, never half of one
        return str((folder / f'{name}.{format}').resolve())
    save_pil_to_cache.atomic = True
    pu.save_pil_to_cache = save_pil_to_cache


def build(st, concurrency=CONCURRENCY):
    "The Gradio Blocks of the app for the loaded run `st`, its two API endpoints `/classify` and `/mistakes`."
    import gradio as gr
    atomic_image_cache()
    # Gradio's cache of uploads and of the pictures it sends: files older than an hour go, checked every 10 minutes.
    with gr.Blocks(title='ResNet-9 on CIFAR-10', analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        tta = ' Probabilities with mirror TTA: the mean of the image\'s and its mirror\'s logits.' if st.tta else ''
        gr.Markdown(f'## ResNet-9 on CIFAR-10\n`{st.run.name}`: {st.headline}.{tta}', elem_id='headline')
        with gr.Row():
            k = gr.Slider(1, len(st.classes), value=3, step=1, label='top k classes', elem_id='k')
            layer = gr.Radio(list(LAYERS), value='layer3', label='Grad-CAM layer', elem_id='layer')
            target = gr.Dropdown([PREDICTED, *st.classes], value=PREDICTED, label='Grad-CAM of', elem_id='target')
            opacity = gr.Slider(0, 1, value=0.5, step=0.05, label='Grad-CAM opacity (0: off)', elem_id='opacity')
        with gr.Tab('Classify'):
            with gr.Row():
                with gr.Column():
                    files = gr.File(file_count='multiple', file_types=['image'], label='images (one or more)',
                                    elem_id='upload')
                    side = math.isqrt(st.max_pixels)
                    pixels = f'{side}×{side}' if side * side == st.max_pixels else f'{st.max_pixels:,}'
                    gr.Markdown(f'Up to {st.max_images} images at a time, each at most {st.max_file_mb} MB and '
                                f'{pixels} pixels.', elem_id='limits')
                    # One example is one value of `files`: a list of one file.
                    if st.examples:
                        gr.Examples([[[p]] for p in st.examples], inputs=files, label='or a test image',
                                    examples_per_page=10)
                with gr.Column():
                    label = gr.Label(num_top_classes=len(st.classes), label='prediction (first image)',
                                     elem_id='prediction')
                    table = gr.Markdown(elem_id='table')
                    cams = gr.Gallery(label='Grad-CAM', columns=3, height='auto', object_fit='contain', format='png',
                                      elem_id='cams')
            inputs = [files, k, layer, target, opacity]

            def classify_images(files, k, layer, target, opacity):
                "Top-k classes and the Grad-CAM of each image: (label dict, [(image, caption)], markdown table)."
                return classify(st, files, k, layer, target, opacity)
            gr.on([c.change for c in inputs], classify_images, inputs, [label, cams, table], api_name='classify',
                  concurrency_limit=concurrency)
        with gr.Tab('Misclassified test images', elem_id='mistakes-tab'):
            n = gr.Slider(1, MAX_MISTAKES, value=10, step=1, label='how many (highest loss first)', elem_id='n')
            show = gr.Button('Show the misclassified test images', elem_id='show-mistakes')
            gallery = gr.Gallery(label='misclassified, with the Grad-CAM of the predicted class', columns=5,
                                 height='auto', format='png', elem_id='mistakes')

            def misclassified(n, layer, opacity):
                "The n highest-loss misclassified test images with the predicted class's Grad-CAM: [(image, caption)]."
                return mistakes(st, n, layer, opacity)
            show.click(misclassified, [n, layer, opacity], gallery, api_name='mistakes', concurrency_limit=concurrency)
    return demo


def steady_heap(arenas=2, mmap_threshold=2**18):
    "Keep glibc's heap from growing with the threads that serve requests (Linux with glibc; elsewhere nothing)."
    # glibc gives each thread that allocates an arena of its own, up to 8 per core, and raises its mmap threshold
    # each time a big block is freed, so the tensors of requests served on many threads end up in heaps it keeps.
    # Measured by experiments/app_load.py, the first round of 8 clients × 5 gallery requests grew the server 313 and
    # 420 MB with glibc's defaults, 52 MB with 2 arenas, 1 MB with 2 arenas and a fixed 256 kB threshold
    # (results/app-load-malloc.log). The same as MALLOC_ARENA_MAX=2 and
    # GLIBC_TUNABLES=glibc.malloc.mmap_threshold=262144, set here so that no one has to.
    import ctypes
    try: glibc = os.confstr('CS_GNU_LIBC_VERSION')
    except (ValueError, OSError, AttributeError): glibc = None  # not Linux
    if not glibc: return False  # musl and others: no mallopt to call
    libc = ctypes.CDLL(None)
    M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's malloc.h
    # Before the app's threads start: glibc fixes its arena limit once it has more than 8 arenas.
    return bool(libc.mallopt(M_ARENA_MAX, arenas)) and bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))


def offline():
    "Nothing leaves the machine: no Gradio analytics or version check, no Hugging Face Hub calls."
    for var, value in (('GRADIO_ANALYTICS_ENABLED', 'False'), ('HF_HUB_OFFLINE', '1'),
                       ('HF_HUB_DISABLE_TELEMETRY', '1')):
        os.environ.setdefault(var, value)


@contextmanager
def serving(run, port=None, timeout=300, log=None, args=(), app=ROOT / 'app.py', python=sys.executable):
    "`python app.py [--run run] [args]` on 127.0.0.1 (default a free port); yields (URL, process, seconds to answer)."
    # The port and host go in the environment, as a Space gives them, so that `run=None` starts the app with no flags
    # in its own folder (tests/test_space.py serves a Space folder so).
    if port is None:
        with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    url, out = f'http://127.0.0.1:{port}/', open(log or os.devnull, 'w')
    env = {**os.environ, 'GRADIO_SERVER_NAME': '127.0.0.1', 'GRADIO_SERVER_PORT': str(port)}
    start = time.perf_counter()
    proc = subprocess.Popen([str(python), str(app), *(['--run', str(run)] if run else []), *map(str, args)],
                            cwd=Path(app).parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None: raise RuntimeError(f'app.py exited with status {proc.returncode} (log: {log})')
            try:
                with urllib.request.urlopen(url, timeout=5): break
            except OSError:
                if time.monotonic() > deadline: raise TimeoutError(f'app.py did not answer at {url} in {timeout} s')
                time.sleep(0.1)
        yield SimpleNamespace(url=url, proc=proc, startup_s=time.perf_counter() - start)
    finally:
        proc.terminate()
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        out.close()


# Last in the file: when run as a script, `call_parse` calls `main` as soon as it is decorated.
@call_parse
def main(run: str = None,          # run folder (default: the newest finished one under runs/)
         host: str = None,         # address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1)
         port: int = None,         # port (default: $GRADIO_SERVER_PORT, else 7860)
         # CIFAR folder with the test images, if not the run's own (read for the mistakes only)
         data: str = None,
         device: str = 'cpu',      # torch device for the model
         max_file_mb: int = MAX_FILE_MB,    # largest upload, in MB (2**20 bytes)
         max_images: int = MAX_IMAGES,      # most images in one classify request
         max_pixels: int = MAX_PIXELS,      # most pixels in one image (width × height), checked before decoding
         concurrency: int = CONCURRENCY,    # requests served at once
         queue: int = QUEUE,                # requests that may wait beyond those
         tta: store_true = False,  # mirror TTA: each image's probabilities from its and its mirror's mean logits
         share: store_true = False):  # also ask Gradio for a public share link (it goes through gradio.live)
    "Serve a Gradio app for a run: top-k classes and Grad-CAM of uploaded images, and the misclassified test images."
    quiet_warnings()  # here, not at the top: this module imports fastai only inside its functions
    offline()
    steady_heap()
    with user_errors('app.py'):
        for flag, v in (('max-file-mb', max_file_mb), ('max-images', max_images), ('max-pixels', max_pixels),
                        ('concurrency', concurrency), ('queue', queue)):
            if v < 1: raise UsageError(f'--{flag} must be at least 1, got {v}')
        st = load(run, data, device, max_file_mb, max_images, max_pixels, tta)
        demo = build(st, concurrency)
    host = host or os.environ.get('GRADIO_SERVER_NAME', '127.0.0.1')  # a Space sets 0.0.0.0
    port = port or int(os.environ.get('GRADIO_SERVER_PORT', 7860))
    print(f'app.py: serving {st.run} at http://{host}:{port} (at most {max_images} images of {max_file_mb} MB and '
          f'{max_pixels:,} pixels a request; {concurrency} at once, {queue} waiting)', flush=True)
    demo.queue(max_size=queue).launch(server_name=host, server_port=port, share=share, ssr_mode=False,
                                      max_file_size=max_file_mb * 2**20, state_session_capacity=SESSIONS,
                                      allowed_paths=[st.examples_dir], css=CSS)
