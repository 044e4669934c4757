"""A web app for a trained run: top-k classes and Grad-CAM of any image, and the test set's mistakes. `python app.py --run DIR`."""
import os, socket, subprocess, sys, tempfile, time, urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # `python app.py` works from anywhere, installed or not (and on a Space)

from fastcore.script import call_parse, store_true

from cli import UsageError, user_errors

LAYERS = ('prep', 'layer1', 'layer2', 'layer3')  # arch.BLOCKS, coarsest last; listed here so --help needs no torch
PREDICTED = 'the predicted class'
SCALE = 8  # 32×32 pictures shown at 256×256, pixels kept square


def load(run=None, data=None, device='cpu'):
    "Everything the app shows, loaded once: the run's model, classes, headline, and its test set (examples, mistakes)."
    from cams import find_run, load_run, run_data
    from interpret import save_test_examples
    from report import headline
    run = find_run(run)  # one line and exit 2 for a bad --run, before any server starts
    for f in ('metrics.csv',):
        if not (run / f).exists(): raise UsageError(f'run folder {run} has no {f}; did its training finish?')
    learn = load_run(run, run_data(run, data), device)
    examples = tempfile.mkdtemp(prefix='resnet9-examples-')  # written from the test set: the repo ships no images
    return SimpleNamespace(run=run, learn=learn, model=learn.model, classes=list(learn.dls.vocab), headline=headline(run),
                           examples=[str(p) for p in save_test_examples(learn.dls.valid, examples, n=10)],
                           examples_dir=examples, interp=None)


def classify(st, files, k, layer, target, opacity):
    "Top-k classes of each uploaded image, and each image with its Grad-CAM: (first image's label dict, gallery, table)."
    import gradio as gr
    from cams import cam_overlay, view_cam
    from predict import network_view, predict
    if not files: return {}, [], ''
    paths = [Path(getattr(f, 'name', f)) for f in (files if isinstance(files, list) else [files])]
    views = []
    for p in paths:  # all read first, with predict.read_image's one-line reason for a broken file
        try: views.append(network_view(p))
        except UsageError as e: raise gr.Error(str(e).replace(str(p), p.name)) from None  # not Gradio's temp path
    labels, gallery, rows = None, [], ['| image | ' + ' | '.join(f'#{i + 1}' for i in range(int(k))) + ' |',
                                       '|---' * (int(k) + 1) + '|']
    for path, view in zip(paths, views):
        top = predict(st.model, view, st.classes, k=int(k))
        labels = labels or {p.label: p.prob for p in top}
        rows.append(f'| {path.name} | ' + ' | '.join(f'{p.label} {p.prob:.3f}' for p in top) + ' |')
        cls = top[0].label if target == PREDICTED else target
        cam = view_cam(st.model, view, layer, st.classes.index(cls)) if opacity > 0 else None
        gallery.append((cam_overlay(view, cam, opacity, SCALE), f'{path.name}: Grad-CAM of {cls} at {layer}'
                        if cam is not None else f'{path.name}: as the network sees it'))
    return labels, gallery, '\n'.join(rows)


def mistakes(st, n, layer, opacity):
    "The `n` highest-loss misclassified test images, each with its predicted class's Grad-CAM at `layer`."
    from cams import cam_overlay, misclassified_cams
    from interpret import interpret
    if st.interp is None: st.interp = interpret(st.learn)  # one pass over the test set, on first use
    return [(cam_overlay(img, cam, opacity, SCALE), caption)
            for img, cam, caption in misclassified_cams(st.model, st.interp, int(n), layer)]


def build(st):
    "The Gradio Blocks of the app for the loaded run `st`."
    import gradio as gr
    with gr.Blocks(title='ResNet-9 on CIFAR-10', analytics_enabled=False) as demo:
        gr.Markdown(f'## ResNet-9 on CIFAR-10\n`{st.run.name}`: {st.headline}', elem_id='headline')
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
                    # One example is one value of `files`: a list of one file.
                    gr.Examples([[[p]] for p in st.examples], inputs=files, label='or a test image', examples_per_page=10)
                with gr.Column():
                    label = gr.Label(num_top_classes=len(st.classes), label='prediction (first image)', elem_id='prediction')
                    cams = gr.Gallery(label='Grad-CAM', columns=3, height=360, object_fit='contain', elem_id='cams')
            table = gr.Markdown(elem_id='table')
            inputs = [files, k, layer, target, opacity]
            for c in inputs: c.change(lambda *a: classify(st, *a), inputs, [label, cams, table])
        with gr.Tab('Misclassified test images', elem_id='mistakes-tab'):
            n = gr.Slider(1, 50, value=10, step=1, label='how many (highest loss first)', elem_id='n')
            show = gr.Button('Show the misclassified test images', elem_id='show-mistakes')
            gallery = gr.Gallery(label='misclassified, with the Grad-CAM of the predicted class', columns=5,
                                 height='auto', elem_id='mistakes')
            show.click(lambda *a: mistakes(st, *a), [n, layer, opacity], gallery)
    return demo


def offline():
    "Nothing leaves the machine: no Gradio analytics or version check, no Hugging Face Hub calls."
    for var, value in (('GRADIO_ANALYTICS_ENABLED', 'False'), ('HF_HUB_OFFLINE', '1'), ('HF_HUB_DISABLE_TELEMETRY', '1')):
        os.environ.setdefault(var, value)


@contextmanager
def serving(run, port=None, timeout=300, log=None):
    "Run `python app.py --run run` on 127.0.0.1 (a free port by default) in a subprocess; yields its URL once it answers."
    if port is None:
        with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    url, out = f'http://127.0.0.1:{port}/', open(log or os.devnull, 'w')
    proc = subprocess.Popen([sys.executable, str(ROOT / 'app.py'), '--run', str(run), '--port', str(port)],
                            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None: raise RuntimeError(f'app.py exited with status {proc.returncode} (log: {log})')
            try:
                with urllib.request.urlopen(url, timeout=5): break
            except OSError:
                if time.monotonic() > deadline: raise TimeoutError(f'app.py did not answer at {url} in {timeout} s')
                time.sleep(0.5)
        yield url
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
         data: str = None,         # CIFAR folder with the test images, if not the run's own
         device: str = 'cpu',      # torch device for the model
         share: store_true = False):  # also ask Gradio for a public share link (it goes through gradio.live)
    "Serve a Gradio app for a trained run: top-k classes and Grad-CAM of uploaded images, and the misclassified test images."
    offline()
    with user_errors('app.py'):
        st = load(run, data, device)
        demo = build(st)
    host = host or os.environ.get('GRADIO_SERVER_NAME', '127.0.0.1')  # a Space sets 0.0.0.0
    port = port or int(os.environ.get('GRADIO_SERVER_PORT', 7860))
    print(f'app.py: serving {st.run} at http://{host}:{port}', flush=True)
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, allowed_paths=[st.examples_dir])
