"""The README and docs/ link only to files, images and headings that exist; the README stays a two-minute read."""
import re

import pytest

from conftest import ROOT

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
FENCE = re.compile(r'^```.*?^```[^\n]*$', re.M | re.S)
# [text](target) and ![alt](target); the text may hold one level of brackets, the target no spaces.
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)(?:\s+"[^"]*")?\)')


def slug(heading):
    "GitHub's anchor for a heading: lower case, punctuation dropped except '-' and '_', each space a '-'."
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def anchors(page):
    "The anchors of a markdown file's headings; a repeated heading gets -1, -2, … as on GitHub."
    seen, out = {}, set()
    for h in re.findall(r'^#{1,6} (.+)$', FENCE.sub('', page.read_text()), re.M):
        s = slug(h)
        out.add(s if s not in seen else f'{s}-{seen[s]}')
        seen[s] = seen.get(s, 0) + 1
    return out


def links(page):
    "Every link and image target of a markdown file, outside code blocks and code spans."
    text = re.sub(r'`[^`\n]*`', '', FENCE.sub('', page.read_text()))
    return LINK.findall(text)


def broken(page):
    "The relative links of `page` whose file, folder or heading does not exist."
    bad = []
    for target in links(page):
        if re.match(r'[a-z][a-z0-9+.-]*:', target): continue  # http:, https:, mailto:: not checked offline
        path, _, anchor = target.partition('#')
        file = (page.parent / path).resolve() if path else page
        # ../shared (the data archive and its notes) sits beside the checkout, not in it: checked where it is there.
        if not file.is_relative_to(ROOT) and not (ROOT.parent / 'shared').is_dir(): continue
        if not file.exists(): bad.append(f'{target}: no such file')
        elif anchor and file.suffix == '.md' and anchor not in anchors(file): bad.append(f'{target}: no such heading')
    return bad


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_link_and_image_resolves(page):
    assert broken(page) == []
    assert len(links(ROOT / 'README.md')) > 20  # the pattern still finds links


def test_the_checker_finds_a_broken_link_image_and_heading(tmp_path):
    (tmp_path / 'a.png').write_bytes(b'')
    (tmp_path / 'b.md').write_text('# What is *this*, `exactly`?\n## Twice\n## Twice\n')
    page = tmp_path / 'page.md'
    page.write_text('# Page\n[ok](b.md) [ok](b.md#what-is-this-exactly) [ok](b.md#twice-1) ![ok](a.png) [ok](#page)\n'
                    '[ok](https://example.com/x) `[not a link](nowhere.md)`\n```\n[in a code block](nowhere.md)\n```\n'
                    '[bad](c.md) ![bad](c.png) [bad](b.md#twice-2) [bad](#nowhere)\n')
    assert broken(page) == ['c.md: no such file', 'c.png: no such file', 'b.md#twice-2: no such heading',
                            '#nowhere: no such heading']


@pytest.mark.parametrize('heading, anchor', [('Precision: `--precision auto`', 'precision---precision-auto'),
                                             ('Why did the network say *dog*?', 'why-did-the-network-say-dog'),
                                             ('Several processes and GPUs', 'several-processes-and-gpus'),
                                             ('Ctrl-C', 'ctrl-c'), ('snake_case, too', 'snake_case-too')])
def test_slugs_follow_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_the_readme_is_at_most_150_lines():
    assert len((ROOT / 'README.md').read_text().splitlines()) <= 150


def test_each_docs_page_opens_with_a_users_question_and_the_readme_links_it():
    readme = set(links(ROOT / 'README.md'))
    for page in PAGES[1:]:
        first = page.read_text().splitlines()[0]
        assert first.startswith('# ') and first.endswith('?'), f'{page.name} opens with {first!r}'
        assert f'docs/{page.name}' in readme, f'the README does not link {page.name}'
