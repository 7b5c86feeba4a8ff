// The qna-gateway chat page: a plain ES module, no build step, no dependencies.
//
// URLs are relative to the page ("v1/chats", not "/v1/chats") so the page works under any path
// prefix; the one exception is an answer's `stream_url`, which the gateway gives as an absolute
// path that already carries the prefix (and, when API keys are on, a token for that stream).
// Model output is only ever put into the page as text (text nodes / textContent).

const KEY_STORAGE = "qna.apiKey";
const STREAM_STORAGE = "qna.stream."; // + message id: its stream_url, for resuming after a reload
const TERMINAL = ["completed", "failed", "cancelled", "interrupted"];
const POLL_MS = 1000;
const NO_CHAT = "Pick a chat on the left, or just ask a question: a new chat is created for it.";
const EMPTY_CHAT = "No questions in this chat yet.";
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  keyPanel: $("key-panel"),
  keyForm: $("key-form"),
  keyInput: $("api-key"),
  keyMessage: $("key-message"),
  forgetKey: $("forget-key"),
  newChatForm: $("new-chat-form"),
  newChatTitle: $("new-chat-title"),
  chatList: $("chat-list"),
  noChats: $("no-chats"),
  moreChats: $("more-chats"),
  chatTitle: $("chat-title"),
  notice: $("notice"),
  noticeText: $("notice-text"),
  noticeClose: $("notice-close"),
  scroller: $("messages-scroller"),
  emptyHint: $("empty-hint"),
  messages: $("messages"),
  askForm: $("ask-form"),
  question: $("question"),
  askButton: $("ask-button"),
  stopButton: $("stop-button"),
};

const state = {
  chats: [],
  nextCursor: null,
  chatId: null,
  opening: 0, // bumps on every openChat, so a slow load cannot paint over a newer one
  views: new Map(), // message id -> view of the open chat
  followers: new Map(), // message id -> {close()} for answers being followed live
  busy: false,
};

// -- small helpers ---------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

/** Length in Unicode code points: the unit of the gateway's offsets (Python str length). */
function codePoints(text) {
  let n = 0;
  for (const _ of text) n += 1;
  return n;
}

function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

function formatTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime())
    ? ""
    : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function chatTitle(chat) {
  return chat.title && chat.title.trim() ? chat.title : "Untitled chat";
}

function chatFromHash() {
  const match = /^#chat=(.+)$/.exec(location.hash);
  const id = match ? decodeURIComponent(match[1]) : null;
  return id && UUID.test(id) ? id : null;
}

function showNotice(message) {
  ui.noticeText.textContent = message;
  ui.notice.hidden = false;
}

function clearNotice() {
  ui.notice.hidden = true;
  ui.noticeText.textContent = "";
}

function report(error) {
  if (error instanceof AuthNeeded) return; // the key panel says it
  showNotice(error instanceof HttpError ? error.message : `Something went wrong: ${error}`);
  console.error(error);
}

// -- the API ---------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

class AuthNeeded extends HttpError {}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

async function api(path, { method = "GET", body, headers = {} } = {}) {
  const sent = { Accept: "application/json", ...headers };
  if (body !== undefined) sent["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) sent.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: sent,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch {
    throw new HttpError(0, "The gateway cannot be reached; check the connection and try again.");
  }
  if (response.status === 401) {
    askForKey(key ? "That API key was not accepted." : "");
    throw new AuthNeeded(401, "An API key is needed.");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`.trim();
    try {
      const problem = await response.json();
      if (problem && typeof problem.detail === "string") detail = problem.detail;
    } catch {
      // not a problem document; the status line will do
    }
    throw new HttpError(response.status, detail);
  }
  return response.status === 204 ? null : response.json();
}

const chatPath = (chatId) => `v1/chats/${encodeURIComponent(chatId)}`;
const messagePath = (chatId, messageId) =>
  `${chatPath(chatId)}/messages/${encodeURIComponent(messageId)}`;

// -- API key ---------------------------------------------------------------------------------

function askForKey(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  stopFollowing();
  ui.app.hidden = true;
  ui.forgetKey.hidden = true;
  ui.keyPanel.hidden = false;
  ui.keyMessage.textContent = message;
  ui.keyMessage.hidden = !message;
  ui.keyInput.value = "";
  ui.keyInput.focus();
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  ui.keyInput.value = "";
  ui.keyPanel.hidden = true;
  start();
});

ui.forgetKey.addEventListener("click", () => askForKey(""));

// -- chats -----------------------------------------------------------------------------------

async function loadChats({ more = false } = {}) {
  const query = new URLSearchParams({ limit: "50" });
  if (more && state.nextCursor) query.set("cursor", state.nextCursor);
  const page = await api(`v1/chats?${query}`);
  state.chats = more ? [...state.chats, ...page.data] : page.data;
  state.nextCursor = page.next_cursor;
  renderChats();
}

function renderChats() {
  ui.chatList.replaceChildren(
    ...state.chats.map((chat) => {
      const item = el("li");
      const link = el("a", "chat-link");
      link.href = `#chat=${encodeURIComponent(chat.id)}`;
      link.dataset.chatId = chat.id;
      if (chat.id === state.chatId) link.setAttribute("aria-current", "page");
      const when = el("time", "chat-time", formatTime(chat.created_at));
      when.dateTime = chat.created_at;
      link.append(el("span", "chat-title", chatTitle(chat)), when);
      item.append(link);
      return item;
    }),
  );
  ui.noChats.hidden = state.chats.length > 0;
  ui.moreChats.hidden = !state.nextCursor;
}

async function createChat(title) {
  const body = title ? { title: title.slice(0, 200) } : {};
  const chat = await api("v1/chats", { method: "POST", body });
  state.chats = [chat, ...state.chats.filter((c) => c.id !== chat.id)];
  // pushState does not fire hashchange: this code opens the chat itself.
  history.pushState(null, "", `#chat=${encodeURIComponent(chat.id)}`);
  await openChat(chat.id, chat);
  return chat.id;
}

ui.newChatForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const title = ui.newChatTitle.value.trim();
  createChat(title)
    .then(() => {
      ui.newChatTitle.value = "";
      ui.question.focus();
    })
    .catch(report);
});

ui.moreChats.addEventListener("click", () => loadChats({ more: true }).catch(report));

// -- one chat --------------------------------------------------------------------------------

async function loadHistory(chatId) {
  const messages = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: "200" });
    if (cursor) query.set("cursor", cursor);
    const page = await api(`${chatPath(chatId)}/messages?${query}`);
    messages.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor && messages.length < 5000);
  return messages;
}

async function openChat(chatId, known) {
  const ticket = ++state.opening;
  stopFollowing();
  clearNotice();
  state.chatId = chatId;
  state.views.clear();
  ui.messages.replaceChildren();
  renderChats();
  updateControls();
  if (!chatId) {
    ui.chatTitle.textContent = "New conversation";
    ui.emptyHint.textContent = NO_CHAT;
    ui.emptyHint.hidden = false;
    return;
  }
  ui.emptyHint.hidden = true;
  let chat = known ?? state.chats.find((c) => c.id === chatId);
  try {
    if (!chat) chat = await api(chatPath(chatId));
    if (ticket !== state.opening) return;
    ui.chatTitle.textContent = chatTitle(chat);
    const messages = await loadHistory(chatId);
    if (ticket !== state.opening) return;
    let question = null;
    for (const message of messages) {
      if (message.role === "user") question = message.content;
      renderMessage(message, question);
    }
    ui.emptyHint.textContent = EMPTY_CHAT;
    ui.emptyHint.hidden = messages.length > 0;
    // Answers still being written: show the stored text, then follow the rest live.
    for (const message of messages) {
      if (message.role === "assistant" && message.status === "streaming") resume(chatId, message);
    }
    scrollToEnd(true);
  } catch (error) {
    if (ticket !== state.opening) return;
    if (error instanceof HttpError && (error.status === 404 || error.status === 400)) {
      ui.chatTitle.textContent = "Chat not found";
      history.replaceState(null, "", location.pathname + location.search);
      state.chatId = null;
    }
    report(error);
  } finally {
    if (ticket === state.opening) updateControls();
  }
}

window.addEventListener("hashchange", () => {
  const chatId = chatFromHash();
  if (chatId !== state.chatId) openChat(chatId);
});

// -- messages --------------------------------------------------------------------------------

const INTERRUPTIONS = {
  client_gone: "nobody was watching it",
  shutdown: "the gateway restarted",
  upstream_timeout: "the model stopped responding",
  crash: "the gateway stopped unexpectedly",
};

class MessageView {
  constructor(message, question) {
    this.id = message.id;
    this.chatId = message.chat_id;
    this.role = message.role;
    this.question = question;
    this.sourceKeys = new Set();
    this.documents = new Map();
    this.toolItems = new Map();

    this.item = el("li", `message message-${message.role}`);
    this.item.dataset.messageId = message.id;
    this.item.dataset.role = message.role;
    const who = el("div", "message-role", message.role === "user" ? "You" : "Assistant");
    this.tools = el("ul", "message-tools");
    this.tools.setAttribute("aria-label", "Knowledge-base searches");
    this.tools.hidden = true;
    this.content = el("div", "message-content");
    this.text = document.createTextNode(message.content);
    this.content.append(this.text);
    this.count = codePoints(message.content);
    this.sourcesBox = el("section", "message-sources");
    this.sourcesBox.setAttribute("aria-label", "Sources");
    this.sourcesBox.append(el("h3", "sources-heading", "Sources"));
    this.sourcesList = el("ol", "sources-list");
    this.sourcesBox.append(this.sourcesList);
    this.sourcesBox.hidden = true;
    this.status = el("div", "message-status");
    this.status.setAttribute("role", "status");
    this.item.append(who, this.tools, this.content, this.sourcesBox, this.status);
    if (message.role === "assistant") this.show(message);
  }

  append(text) {
    if (!text) return;
    this.text.appendData(text);
    this.count += codePoints(text);
  }

  addToolCall(call) {
    const line = el("li", "tool-call");
    const query = typeof call.query === "string" ? call.query : null;
    const icon = el("span", "tool-icon", "⌕");
    icon.setAttribute("aria-hidden", "true");
    line.append(
      icon,
      document.createTextNode(query ? "Searched the knowledge base for " : `Called ${call.name} `),
      el("q", "tool-query", query ?? call.arguments ?? ""),
    );
    const outcome = el("span", "tool-outcome", " …");
    line.append(outcome);
    this.toolItems.set(call.id, outcome);
    this.tools.append(line);
    this.tools.hidden = false;
  }

  addToolResult(result) {
    const outcome = this.toolItems.get(result.id);
    const sources = Array.isArray(result.sources) ? result.sources : [];
    if (outcome) {
      outcome.textContent = result.error
        ? ` — failed: ${result.error}`
        : ` — ${sources.length} passage${sources.length === 1 ? "" : "s"}`;
    }
    this.addSources(sources);
  }

  /** Sources grouped by document: the document's name, and its passages on demand. */
  addSources(sources) {
    for (const source of sources || []) {
      const key = `${source.document}#${source.chunk}`;
      if (this.sourceKeys.has(key)) continue;
      this.sourceKeys.add(key);
      let doc = this.documents.get(source.document);
      if (!doc) {
        const item = el("li", "source");
        item.id = `source-${this.id}-${this.documents.size + 1}`;
        item.dataset.document = source.document;
        const details = el("details");
        const summary = el("summary");
        summary.append(el("cite", "source-document", source.document));
        if (source.title && source.title !== source.document) {
          summary.append(el("span", "source-title", source.title));
        }
        const count = el("span", "source-count");
        summary.append(count);
        details.append(summary);
        item.append(details);
        this.sourcesList.append(item);
        doc = { details, count, passages: 0 };
        this.documents.set(source.document, doc);
      }
      doc.passages += 1;
      doc.count.textContent = doc.passages > 1 ? `${doc.passages} passages` : "";
      const score = typeof source.score === "number" ? source.score.toFixed(2) : "?";
      doc.details.append(
        el("blockquote", "source-snippet", source.snippet),
        el("p", "source-meta", `Passage ${source.chunk} · relevance ${score}`),
      );
    }
    this.sourcesBox.hidden = this.documents.size === 0;
  }

  setConnection(what) {
    if (this.item.dataset.status !== "streaming") return;
    this.item.dataset.connection = what;
    this.status.replaceChildren(
      el("span", "spinner"),
      document.createTextNode(what === "reconnecting" ? "Reconnecting…" : "Answering…"),
    );
  }

  /** Paint the message's status (and, when it ended, its sources and a Retry button). */
  show(message) {
    this.item.dataset.status = message.status;
    const streaming = message.status === "streaming";
    this.content.setAttribute("aria-live", streaming ? "polite" : "off");
    this.content.setAttribute("aria-busy", streaming ? "true" : "false");
    this.addSources(message.sources);
    this.status.replaceChildren();
    this.status.hidden = message.status === "completed";
    if (streaming) {
      this.setConnection(this.item.dataset.connection || "live");
      return;
    }
    if (message.status === "completed") return;
    let text;
    if (message.status === "cancelled") text = "Cancelled.";
    else if (message.status === "failed") text = sentence(`Failed: ${message.error || "the model call failed"}`);
    else {
      const why = INTERRUPTIONS[message.finish_reason] || message.finish_reason || "unknown reason";
      text = sentence(`Interrupted: ${why}`);
    }
    this.status.append(el("span", "status-text", text));
    if (this.question !== null && this.question !== undefined) {
      const retry = el("button", "retry", "Retry");
      retry.type = "button";
      retry.disabled = state.busy || state.followers.size > 0;
      retry.addEventListener("click", () => ask(this.question));
      this.status.append(retry);
    }
  }
}

function renderMessage(message, question) {
  const view = new MessageView(message, question);
  state.views.set(message.id, view);
  ui.messages.append(view.item);
  ui.emptyHint.hidden = true;
  return view;
}

// -- following an answer ---------------------------------------------------------------------

function stopFollowing() {
  for (const follower of state.followers.values()) follower.close();
  state.followers.clear();
}

/** Follow an answer over SSE. EventSource reconnects by itself after a drop or a `reconnect`
 * event, sending Last-Event-ID; the gateway then replays exactly what is missing. */
function follow(view, url) {
  const source = new EventSource(url);
  state.followers.set(view.id, { close: () => source.close() });
  view.item.dataset.transport = "sse";
  const data = (event) => JSON.parse(event.data);
  source.addEventListener("open", () => view.setConnection("live"));
  source.addEventListener("tool.call", (event) => view.addToolCall(data(event)));
  source.addEventListener("tool.result", (event) => view.addToolResult(data(event)));
  source.addEventListener("message.delta", (event) => {
    const near = nearEnd();
    view.append(data(event).text);
    if (near) scrollToEnd();
  });
  source.addEventListener("reconnect", () => view.setConnection("reconnecting"));
  for (const status of TERMINAL) {
    source.addEventListener(`message.${status}`, (event) => {
      source.close(); // an open EventSource would reconnect after the end
      finish(view, data(event));
    });
  }
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) {
      // Refused for good (an expired stream token, a 4xx): keep up by reading the message.
      if (state.followers.has(view.id)) poll(view);
    } else {
      view.setConnection("reconnecting");
    }
  });
  updateControls();
}

/** Follow an answer by reading it now and then: for when no stream can be opened. */
function poll(view) {
  const follower = {
    stopped: false,
    timer: 0,
    close() {
      this.stopped = true;
      clearTimeout(this.timer);
    },
  };
  state.followers.set(view.id, follower);
  view.item.dataset.transport = "poll";
  const tick = async () => {
    if (follower.stopped) return;
    try {
      const message = await api(messagePath(view.chatId, view.id));
      if (follower.stopped) return;
      const chars = Array.from(message.content);
      if (chars.length > view.count) view.append(chars.slice(view.count).join(""));
      if (TERMINAL.includes(message.status)) {
        finish(view, message);
        return;
      }
      view.setConnection("live");
    } catch (error) {
      if (error instanceof AuthNeeded || (error instanceof HttpError && error.status === 404)) {
        follower.close();
        state.followers.delete(view.id);
        updateControls();
        return;
      }
      view.setConnection("reconnecting");
    }
    follower.timer = setTimeout(tick, POLL_MS);
  };
  tick();
  updateControls();
}

/** After a reload: the stored text is on screen; ask for what comes after it. */
function resume(chatId, message) {
  const view = state.views.get(message.id);
  // Event ids are "<first 8 hex digits of the id>.<offset in code points>".
  const lastEventId = `${message.id.replaceAll("-", "").slice(0, 8)}.${codePoints(message.content)}`;
  const saved = sessionStorage.getItem(STREAM_STORAGE + message.id);
  if (!saved && apiKey()) {
    poll(view); // with API keys on, a stream needs the token its ask returned
    return;
  }
  const url = new URL(saved || `${messagePath(chatId, message.id)}/stream`, location.href);
  url.searchParams.set("last_event_id", lastEventId);
  follow(view, url.href);
}

function finish(view, message) {
  const follower = state.followers.get(view.id);
  if (follower) follower.close();
  state.followers.delete(view.id);
  sessionStorage.removeItem(STREAM_STORAGE + view.id);
  if (view.text.data !== message.content) {
    // Never expected: the gateway's resume rule makes the deltas add up to the content.
    console.warn("answer text differs from the stored content; showing the stored content");
    view.text.data = message.content;
    view.count = codePoints(message.content);
    view.item.dataset.resynced = "true";
  }
  view.show(message);
  updateControls();
}

// -- asking ----------------------------------------------------------------------------------

async function ask(question) {
  if (state.busy || !question.trim()) return;
  clearNotice();
  state.busy = true;
  updateControls();
  try {
    const chatId = state.chatId ?? (await createChat(question.trim().slice(0, 60)));
    const accepted = await api(`${chatPath(chatId)}/messages`, {
      method: "POST",
      body: { content: question },
      headers: { Prefer: "respond-async" },
    });
    if (ui.question.value === question) ui.question.value = "";
    if (state.chatId !== chatId) return;
    renderMessage(accepted.user_message, null);
    const view = renderMessage(accepted.assistant_message, question);
    // Kept for this tab, so a reload can reopen the stream (it may carry a token).
    sessionStorage.setItem(STREAM_STORAGE + view.id, accepted.stream_url);
    follow(view, accepted.stream_url);
    scrollToEnd(true);
  } catch (error) {
    report(error);
  } finally {
    state.busy = false;
    updateControls();
  }
}

ui.askForm.addEventListener("submit", (event) => {
  event.preventDefault();
  ask(ui.question.value);
});

ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.askForm.requestSubmit();
  }
});

ui.stopButton.addEventListener("click", async () => {
  const running = [...state.followers.keys()];
  if (!running.length || !state.chatId) return;
  ui.stopButton.disabled = true;
  try {
    // The stream then delivers the rest of the text and `message.cancelled`.
    await Promise.all(
      running.map((id) => api(`${messagePath(state.chatId, id)}/cancel`, { method: "POST" })),
    );
  } catch (error) {
    report(error);
    ui.stopButton.disabled = false;
  }
});

ui.noticeClose.addEventListener("click", clearNotice);

function updateControls() {
  const answering = state.followers.size > 0;
  ui.askButton.disabled = state.busy || answering;
  ui.stopButton.hidden = !answering;
  if (answering) ui.stopButton.disabled = false;
  for (const button of ui.messages.querySelectorAll("button.retry")) {
    button.disabled = state.busy || answering;
  }
  ui.forgetKey.hidden = !apiKey();
}

function nearEnd() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToEnd(force = false) {
  if (force || nearEnd()) ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

// -- start -----------------------------------------------------------------------------------

async function start() {
  try {
    await loadChats();
  } catch (error) {
    if (!(error instanceof AuthNeeded)) {
      ui.app.hidden = false;
      report(error);
    }
    return;
  }
  ui.keyPanel.hidden = true;
  ui.app.hidden = false;
  updateControls();
  await openChat(chatFromHash());
}

start();
