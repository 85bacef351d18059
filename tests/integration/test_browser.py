"""The browser client and the demo app in real headless Chromium (Debian's package, driven
by Playwright through `executable_path`; no browser is ever downloaded).

Two people chat through two gateway nodes and see each other's votes and comments live;
the JavaScript client's reconnect rules run against a scripted socket; and it moves to the
other node when its node drains, with nothing missed or repeated. Screenshots of the app
are saved under .agora/test/artifacts/.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agora_client import AgoraClient
from core.settings import Settings
from tests.integration.helpers import create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

CHROMIUM = os.environ.get("AGORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(".agora/test/artifacts")
SPEC = Path(__file__).resolve().parents[1] / "browser" / "client_spec.js"
WAIT_MS = 15_000

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    if not (Path(CHROMIUM).exists() or shutil.which("chromium")):
        pytest.skip(f"{CHROMIUM} missing: run scripts/bootstrap as root (apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    s = Stack(settings, extra_env={"AGORA_DEV_TOKENS": "true", "AGORA_PRESENCE_GRACE_S": "2"})
    try:
        s.gateway("web-g1")
        s.gateway("web-g2")
        s.fanout("web-f")
        s.scores("web-s")
        yield s
    finally:
        s.stop_all()


@pytest.fixture(scope="module")
async def browser(stack: Stack) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


def node(stack: Stack, name: str) -> Proc:
    return next(p for p in stack.procs if p.name == name)


async def new_page(browser: Any, url: str) -> Any:
    context = await browser.new_context(viewport={"width": 1200, "height": 760})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(url)
    return page


async def sign_in(page: Any, user: str) -> None:
    await page.get_by_test_id("signin-user").fill(user)
    await page.get_by_test_id("signin-submit").click()
    await expect(page.get_by_test_id("me")).to_have_text(user, timeout=WAIT_MS)
    await expect(page.get_by_test_id("conn-state")).to_contain_text("online", timeout=WAIT_MS)


async def test_agora_js_reconnect_rules_against_a_scripted_socket(
    stack: Stack, browser: Any
) -> None:
    page = await new_page(browser, node(stack, "web-g1").http_url + "/")
    results = await page.evaluate("async () => {\n" + SPEC.read_text() + "\n}")
    failed = {k: v for k, v in results.items() if v != "ok"}
    print(f"{len(results)} scenarios, failed: {failed}")
    assert len(results) >= 9 and not failed
    await page.context.close()


async def test_two_people_chat_and_vote_live_through_two_nodes(stack: Stack, browser: Any) -> None:
    g1, g2 = node(stack, "web-g1"), node(stack, "web-g2")
    alice_id, bob_id = uid("alice"), uid("bob")
    alice = await new_page(browser, g1.http_url + "/")
    bob = await new_page(browser, g2.http_url + "/")
    await sign_in(alice, alice_id)
    await sign_in(bob, bob_id)
    nodes = [await p.get_by_test_id("conn-state").inner_text() for p in (alice, bob)]
    assert nodes[0] != nodes[1], f"both on one node: {nodes}"

    # Alice starts a group with Bob; it appears in Bob's list without a reload.
    await alice.get_by_test_id("new-conv-members").fill(bob_id)
    await alice.locator("#new-conv-title").fill("Lunch")
    await alice.get_by_test_id("new-conv-submit").click()
    await expect(alice.get_by_test_id("chat-title")).to_have_text("Lunch", timeout=WAIT_MS)
    await bob.get_by_test_id("conv-list").get_by_text("Lunch").click(timeout=WAIT_MS)
    await expect(bob.get_by_test_id("chat-title")).to_have_text("Lunch", timeout=WAIT_MS)

    # Typing shows on the other side, then the message itself, both ways.
    await alice.get_by_test_id("composer-input").press_sequentially("hello bob", delay=20)
    await expect(bob.get_by_test_id("typing")).to_contain_text(
        f"{alice_id} is typing", timeout=WAIT_MS
    )
    await alice.get_by_test_id("composer-input").press("Enter")
    await expect(bob.get_by_test_id("messages")).to_contain_text("hello bob", timeout=WAIT_MS)
    await expect(bob.get_by_test_id("typing")).to_have_text("", timeout=WAIT_MS)
    await bob.get_by_test_id("composer-input").fill("hi alice, 12:30?")
    await bob.get_by_test_id("composer-send").click()
    await expect(alice.get_by_test_id("messages")).to_contain_text("12:30?", timeout=WAIT_MS)
    await expect(alice.locator("#messages li")).to_have_count(2)
    await expect(alice.locator("#messages li.pending")).to_have_count(0)
    await alice.screenshot(path=str(ARTIFACTS / "chat-alice.png"))

    # Community: Alice posts, Bob finds it, votes and comments; Alice sees both live.
    community = f"e2e_{int(time.time()) % 100000}"
    await alice.get_by_test_id("tab-feed").click()
    await alice.get_by_test_id("new-post-community").fill(community)
    await alice.get_by_test_id("new-post-title").fill("Agora is live")
    await alice.locator("#new-post-body").fill("Votes and comments arrive without a reload.")
    await alice.get_by_test_id("new-post-submit").click()
    await expect(alice.get_by_test_id("post-view")).to_be_visible(timeout=WAIT_MS)
    await expect(alice.get_by_test_id("post-score")).to_have_text("0")

    await bob.get_by_test_id("tab-feed").click()
    await bob.get_by_test_id("feed-community").fill(community)
    await bob.get_by_test_id("feed-kind").select_option("new")
    await bob.get_by_test_id("post-list").get_by_text("Agora is live").click(timeout=WAIT_MS)
    await expect(bob.get_by_test_id("post-view")).to_be_visible(timeout=WAIT_MS)
    await bob.get_by_test_id("post-view").get_by_test_id("vote-up").click()
    await expect(bob.get_by_test_id("post-score")).to_have_text("1", timeout=WAIT_MS)
    # Alice never reloads: the score frame from the scores worker updates her page.
    await expect(alice.get_by_test_id("post-score")).to_have_text("1", timeout=WAIT_MS)
    # Her feed list is global (other tests' posts may be in it): the item of this post.
    item = alice.get_by_test_id("post-list").get_by_role("listitem").filter(has_text=community)
    await expect(item.get_by_test_id("score")).to_have_text("1")

    await bob.get_by_test_id("comment-input").fill("first!")
    await bob.get_by_test_id("comment-send").click()
    await expect(alice.get_by_test_id("comments")).to_contain_text("first!", timeout=WAIT_MS)
    await alice.screenshot(path=str(ARTIFACTS / "community-alice.png"))
    await bob.screenshot(path=str(ARTIFACTS / "community-bob.png"))
    assert alice.errors == [] and bob.errors == [], (alice.errors, bob.errors)
    for p in (alice, bob):
        await p.context.close()


async def test_edit_delete_react_and_reply_live_through_two_nodes(
    stack: Stack, browser: Any
) -> None:
    g1, g2 = node(stack, "web-g1"), node(stack, "web-g2")
    alice_id, bob_id = uid("alice"), uid("bob")
    alice = await new_page(browser, g1.http_url + "/")
    bob = await new_page(browser, g2.http_url + "/")
    await sign_in(alice, alice_id)
    await sign_in(bob, bob_id)
    await alice.get_by_test_id("new-conv-members").fill(bob_id)
    await alice.locator("#new-conv-title").fill("Edits")
    await alice.get_by_test_id("new-conv-submit").click()
    await expect(alice.get_by_test_id("chat-title")).to_have_text("Edits", timeout=WAIT_MS)
    await bob.get_by_test_id("conv-list").get_by_text("Edits").click(timeout=WAIT_MS)
    await expect(bob.get_by_test_id("chat-title")).to_have_text("Edits", timeout=WAIT_MS)

    await alice.get_by_test_id("composer-input").fill("lunch at 12?")
    await alice.get_by_test_id("composer-input").press("Enter")
    # The message itself (a reply quoting it contains its text too, but not as its body).
    bobs_view = bob.locator("#messages li").filter(has=bob.locator(".body", has_text="lunch at"))
    await expect(bobs_view).to_have_count(1, timeout=WAIT_MS)

    # Alice edits: Bob sees the new text marked edited, without a reload.
    alices_msg = alice.locator("#messages li").filter(
        has=alice.locator(".body", has_text="lunch at")
    )
    await alices_msg.get_by_test_id("edit").click()
    await alice.get_by_test_id("composer-input").fill("lunch at 12:30?")
    await alice.get_by_test_id("composer-input").press("Enter")
    await expect(bobs_view).to_contain_text("lunch at 12:30? (edited)", timeout=WAIT_MS)
    # Bob cannot edit her message: no edit button on it.
    await expect(bobs_view.get_by_test_id("edit")).to_have_count(0)

    # Bob reacts and replies; Alice sees the count and the quote.
    await bobs_view.get_by_test_id("react").click()
    await expect(alices_msg.get_by_test_id("reaction")).to_have_text("👍 1", timeout=WAIT_MS)
    await bobs_view.get_by_test_id("reply").click()
    await expect(bob.get_by_test_id("composer-mode")).to_contain_text("Replying to")
    await bob.get_by_test_id("composer-input").fill("yes!")
    await bob.get_by_test_id("composer-send").click()
    reply = alice.locator("#messages li").filter(has_text="yes!")
    await expect(reply.get_by_test_id("quote")).to_contain_text("lunch at 12:30?", timeout=WAIT_MS)
    # Alice reacts too, then Bob takes his back: counts stay exact on both sides.
    await alices_msg.get_by_test_id("react").click()
    await expect(bobs_view.get_by_test_id("reaction")).to_have_text("👍 2", timeout=WAIT_MS)
    await bobs_view.get_by_test_id("reaction").click()
    await expect(alices_msg.get_by_test_id("reaction")).to_have_text("👍 1", timeout=WAIT_MS)
    await alice.screenshot(path=str(ARTIFACTS / "events-alice.png"))

    # Alice deletes: a tombstone on both sides, and after Bob reloads (from history).
    await alices_msg.get_by_test_id("delete").click()
    tomb = bob.locator("#messages li").get_by_test_id("tombstone")
    await expect(tomb).to_have_count(1, timeout=WAIT_MS)
    await expect(reply.get_by_test_id("quote")).to_contain_text("deleted message", timeout=WAIT_MS)
    await bob.reload()
    await expect(bob.get_by_test_id("conn-state")).to_contain_text("online", timeout=WAIT_MS)
    await bob.get_by_test_id("conv-list").get_by_text("Edits").click(timeout=WAIT_MS)
    await expect(bob.locator("#messages li").get_by_test_id("tombstone")).to_have_count(
        1, timeout=WAIT_MS
    )
    await expect(bob.get_by_test_id("messages")).not_to_contain_text("12:30")
    await bob.screenshot(path=str(ARTIFACTS / "events-bob.png"))
    assert alice.errors == [] and bob.errors == [], (alice.errors, bob.errors)
    for p in (alice, bob):
        await p.context.close()


async def test_a_second_device_clears_its_badge_and_the_sender_sees_seen(
    stack: Stack, browser: Any
) -> None:
    g1, g2 = node(stack, "web-g1"), node(stack, "web-g2")
    alice_id, bob_id = uid("alice"), uid("bob")
    phone = await new_page(browser, g1.http_url + "/")
    laptop = await new_page(browser, g2.http_url + "/")
    bob = await new_page(browser, g1.http_url + "/")
    for page, user in ((phone, alice_id), (laptop, alice_id), (bob, bob_id)):
        await sign_in(page, user)
    await bob.get_by_test_id("new-conv-members").fill(alice_id)
    await bob.locator("#new-conv-title").fill("Badges")
    await bob.get_by_test_id("new-conv-submit").click()
    await expect(bob.get_by_test_id("chat-title")).to_have_text("Badges", timeout=WAIT_MS)
    for text in ("one", "two"):
        await bob.get_by_test_id("composer-input").fill(text)
        await bob.get_by_test_id("composer-input").press("Enter")
    for device in (phone, laptop):
        entry = device.get_by_test_id("conv-list").get_by_role("listitem").filter(has_text="Badges")
        await expect(entry.get_by_test_id("unread")).to_have_text("2", timeout=WAIT_MS)

    # Alice reads on her phone: the laptop's badge goes (a `read` frame through the other
    # node), and Bob sees that she has seen his messages.
    await phone.get_by_test_id("conv-list").get_by_text("Badges").click()
    await expect(phone.get_by_test_id("messages")).to_contain_text("two", timeout=WAIT_MS)
    laptop_entry = (
        laptop.get_by_test_id("conv-list").get_by_role("listitem").filter(has_text="Badges")
    )
    await expect(laptop_entry.get_by_test_id("unread")).to_have_count(0, timeout=WAIT_MS)
    await expect(bob.get_by_test_id("seen")).to_have_text(f"seen by {alice_id}", timeout=WAIT_MS)
    # The server's count agrees after a reload; a new message brings the badge back.
    await laptop.reload()
    await expect(laptop.get_by_test_id("conn-state")).to_contain_text("online", timeout=WAIT_MS)
    await expect(laptop.get_by_test_id("conv-list")).to_contain_text("Badges", timeout=WAIT_MS)
    await expect(laptop_entry.get_by_test_id("unread")).to_have_count(0)
    await phone.get_by_test_id("tab-feed").click()  # the phone looks elsewhere now
    await bob.get_by_test_id("composer-input").fill("three")
    await bob.get_by_test_id("composer-input").press("Enter")
    await expect(laptop_entry.get_by_test_id("unread")).to_have_text("1", timeout=WAIT_MS)
    await bob.screenshot(path=str(ARTIFACTS / "seen-bob.png"))
    for p in (phone, laptop, bob):
        assert p.errors == [], p.errors
        await p.context.close()


async def test_inbox_keeps_a_mention_for_an_offline_user_and_notifies_live(
    stack: Stack, browser: Any
) -> None:
    g1, g2 = node(stack, "web-g1"), node(stack, "web-g2")
    alice_id, bob_id = uid("alice"), uid("bob")
    bob = await new_page(browser, g1.http_url + "/")
    await sign_in(bob, bob_id)
    await bob.get_by_test_id("new-conv-members").fill(alice_id)
    await bob.locator("#new-conv-title").fill("Inbox")
    await bob.get_by_test_id("new-conv-submit").click()
    await expect(bob.get_by_test_id("chat-title")).to_have_text("Inbox", timeout=WAIT_MS)
    await bob.get_by_test_id("composer-input").fill(f"@{alice_id} while you were away")
    await bob.get_by_test_id("composer-input").press("Enter")
    await expect(bob.locator("#messages li.pending")).to_have_count(0, timeout=WAIT_MS)

    alice = await new_page(browser, g2.http_url + "/")  # she comes online only now
    await sign_in(alice, alice_id)
    await expect(alice.get_by_test_id("bell-count")).to_have_text("1", timeout=WAIT_MS)
    await alice.get_by_test_id("bell").click()
    await expect(alice.get_by_test_id("note")).to_contain_text(f"{bob_id} mentioned you")
    await bob.get_by_test_id("composer-input").fill(f"and now live, @{alice_id}")
    await bob.get_by_test_id("composer-input").press("Enter")
    await expect(alice.get_by_test_id("bell-count")).to_have_text("2", timeout=WAIT_MS)
    await expect(alice.get_by_test_id("note")).to_have_count(2, timeout=WAIT_MS)
    await alice.screenshot(path=str(ARTIFACTS / "inbox-alice.png"))
    await alice.get_by_test_id("inbox-read").click()
    await expect(alice.get_by_test_id("bell-count")).to_have_text("0", timeout=WAIT_MS)
    for p in (alice, bob):
        assert p.errors == [], p.errors
        await p.context.close()


async def test_presence_dots_follow_a_user_across_nodes(stack: Stack, browser: Any) -> None:
    g1, g2 = node(stack, "web-g1"), node(stack, "web-g2")
    alice_id, bob_id = uid("alice"), uid("bob")
    alice = await new_page(browser, g1.http_url + "/")
    await sign_in(alice, alice_id)
    await alice.get_by_test_id("new-conv-members").fill(bob_id)
    await alice.locator("#new-conv-title").fill("Dots")
    await alice.get_by_test_id("new-conv-submit").click()
    await expect(alice.get_by_test_id("chat-title")).to_have_text("Dots", timeout=WAIT_MS)
    bobs_dot = alice.locator(f'[data-testid="member"][data-user="{bob_id}"]')
    await expect(bobs_dot).to_have_attribute("data-online", "no", timeout=WAIT_MS)
    bob = await new_page(browser, g2.http_url + "/")
    await sign_in(bob, bob_id)
    await expect(bobs_dot).to_have_attribute("data-online", "yes", timeout=WAIT_MS)
    await alice.screenshot(path=str(ARTIFACTS / "presence-alice.png"))
    await bob.context.close()  # gone: offline after the grace period (2 s here)
    await expect(bobs_dot).to_have_attribute("data-online", "no", timeout=WAIT_MS)
    assert alice.errors == [], alice.errors
    await alice.context.close()


async def test_agora_js_moves_to_the_other_node_when_its_node_drains(
    stack: Stack, browser: Any
) -> None:
    import httpx

    g2 = node(stack, "web-g2")
    doomed = stack.gateway(f"web-doomed-{uid('x')}")
    a, b = uid("sender"), uid("reader")
    async with httpx.AsyncClient(timeout=20) as http:
        conv = await create_group(http, stack, g2, a, [b])
    page = await new_page(browser, g2.http_url + "/")
    first_node = await page.evaluate(
        """async ([urls, token, conv]) => {
            const { AgoraClient } = await import("/static/agora.js");
            const c = new AgoraClient({ url: urls, token, backoff: { baseMs: 100, maxMs: 500 } });
            window.seen = [];
            window.events = [];
            c.on("msg", (m) => window.seen.push(m.seq));
            c.on("reconnecting", (e) => window.events.push(["reconnecting", e.afterMs]));
            c.on("close", (e) => window.events.push(["close", e.code]));
            window.client = c;
            c.connect();
            while (c.state !== "open") await new Promise((r) => setTimeout(r, 10));
            await c.subscribe(conv);
            return c.hello.node;
        }""",
        [[doomed.ws_url, g2.ws_url], stack.token(b), conv],
    )
    sender = await AgoraClient.connect(g2.ws_url, stack.token(a))
    for i in range(5):
        await sender.send(conv, f"before {i}", cid=f"b{i}")
    await page.wait_for_function("window.seen.length === 5", timeout=WAIT_MS)

    async def keep_sending() -> None:
        for i in range(20):
            await sender.send(conv, f"during {i}", cid=f"d{i}")
            await asyncio.sleep(0.03)

    stopping = asyncio.create_task(asyncio.to_thread(doomed.stop))  # SIGTERM: drain
    await keep_sending()
    own = await page.evaluate(
        "async (conv) => (await window.client.send(conv, 'mine', { cid: 'own-1' })).id", conv
    )
    await stopping
    await page.wait_for_function("window.seen.length === 26", timeout=WAIT_MS)
    seen = await page.evaluate("window.seen")
    events = await page.evaluate("window.events")
    now_node = await page.evaluate("window.client.hello && window.client.hello.node")
    print(f"moved {first_node} -> {now_node}; events {events}; seen {seen}")
    assert now_node and now_node != first_node
    # Told to move, left once, and went straight to the other node (no refused attempt).
    assert [e[0] for e in events] == ["reconnecting", "close"], events
    assert seen == list(range(1, 27)), "a gap or a duplicate"
    assert isinstance(own, str) and own.isdigit()
    # A fence: deliveries keep the conversation's order, so a late duplicate of any of
    # the above would arrive before this one.
    await sender.send(conv, "fence", cid="fence")
    await page.wait_for_function("window.seen.length >= 27", timeout=WAIT_MS)
    assert await page.evaluate("window.seen") == list(range(1, 28)), "a late duplicate"
    await sender.close()
    await page.context.close()
