// The peerinfer page: a chat over the OpenAI API of whoever serves it (a worker or a gateway) and a
// live table of the network. Plain script, no build step, nothing from the internet.
//
// Every string that came from a server (a model name, a peer id, an answer, an error) is written
// with textContent, never as markup: a peer's model name is a stranger's text.
"use strict";

(() => {
  const KEY_STORAGE = "peerinfer.api_key";
  const NETWORK_EVERY_MS = 3000;
  const NETWORK_TIMEOUT_MS = 8000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    mode: $("mode"),
    conversation: $("conversation"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    regenerate: $("regenerate"),
    newChat: $("new-chat"),
    status: $("status"),
    model: $("model"),
    system: $("system"),
    temperature: $("temperature"),
    maxTokens: $("max-tokens"),
    apiKey: $("api-key"),
    peers: document.querySelector("#peers tbody"),
    networkSource: $("network-source"),
    networkStatus: $("network-status"),
  };

  const state = {
    history: [], // {role, content} of the finished turns
    controller: null, // the AbortController of the answer being streamed
    serverMode: null, // "worker" or "gateway", from /network
    lastRequest: null, // the messages of the last request, for Regenerate
  };

  // --- text and languages -------------------------------------------------------------------

  // The language of a text by its script, so that the browser picks a font (and line breaking)
  // made for it. A guess by script only: Devanagari is written for Hindi, Marathi, Nepali...
  const SCRIPTS = [
    [/\p{Script=Devanagari}/u, "hi"],
    [/\p{Script=Tamil}/u, "ta"],
    [/\p{Script=Bengali}/u, "bn"],
    [/\p{Script=Telugu}/u, "te"],
    [/\p{Script=Kannada}/u, "kn"],
    [/\p{Script=Malayalam}/u, "ml"],
    [/\p{Script=Gujarati}/u, "gu"],
    [/\p{Script=Gurmukhi}/u, "pa"],
    [/\p{Script=Oriya}/u, "or"],
    [/\p{Script=Arabic}/u, "ar"],
    [/\p{Script=Hebrew}/u, "he"],
    [/\p{Script=Han}/u, "zh"],
  ];

  function languageOf(text) {
    const sample = text.slice(0, 400);
    for (const [pattern, lang] of SCRIPTS) {
      if (pattern.test(sample)) return lang;
    }
    return null;
  }

  function setText(element, text) {
    element.textContent = text;
    const lang = languageOf(text);
    if (lang) element.lang = lang;
    else element.removeAttribute("lang");
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function shortId(id) {
    return typeof id === "string" && id.length > 16 ? id.slice(0, 12) + "…" : String(id);
  }

  function say(text) {
    ui.status.textContent = text;
  }

  // --- the API key ----------------------------------------------------------------------------

  function apiKey() {
    return ui.apiKey.value.trim();
  }

  function headers(json) {
    const result = {};
    if (json) result["Content-Type"] = "application/json";
    const key = apiKey();
    if (key) result.Authorization = "Bearer " + key;
    return result;
  }

  function needKey(message) {
    say(message || "This server needs an API key: enter it under Settings.");
    ui.apiKey.setAttribute("aria-invalid", "true");
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error && typeof body.error.message === "string") return body.error.message;
    } catch (_) {
      // not JSON: the status says enough
    }
    return "HTTP " + response.status;
  }

  // --- models ---------------------------------------------------------------------------------

  async function loadModels() {
    let response;
    try {
      response = await fetch("v1/models", { headers: headers(false) });
    } catch (_) {
      say("Cannot reach the server.");
      return;
    }
    if (response.status === 401) {
      needKey(await errorMessage(response));
      return;
    }
    if (!response.ok) {
      say("No model yet: " + (await errorMessage(response)));
      setTimeout(loadModels, 3000);
      return;
    }
    ui.apiKey.removeAttribute("aria-invalid");
    let body;
    try {
      body = await response.json();
    } catch (_) {
      say("The server's model list is not JSON.");
      return;
    }
    const chosen = ui.model.value;
    const ids = Array.isArray(body && body.data)
      ? body.data.map((m) => m && m.id).filter((id) => typeof id === "string")
      : [];
    ui.model.replaceChildren(
      ...ids.map((id) => {
        const option = el("option", null, id);
        option.value = id;
        return option;
      }),
    );
    if (ids.includes(chosen)) ui.model.value = chosen;
    if (ids.length === 0) say("The server lists no model yet.");
    else if (!state.controller) say("");
  }

  // --- SSE ------------------------------------------------------------------------------------

  // Server-sent events from a fetch body: bytes in, the data of each complete event out. A UTF-8
  // character split between two reads is held by the decoder (stream mode) until it is whole.
  class EventReader {
    constructor() {
      this.decoder = new TextDecoder("utf-8");
      this.buffer = "";
    }

    push(bytes) {
      return this.feed(this.decoder.decode(bytes, { stream: true }));
    }

    end() {
      return this.feed(this.decoder.decode() + "\n\n");
    }

    feed(text) {
      this.buffer += text;
      // A "\r" at the end may be the first half of "\r\n": keep it for the next read.
      const held = this.buffer.endsWith("\r") ? "\r" : "";
      const whole = (held ? this.buffer.slice(0, -1) : this.buffer).replace(/\r\n?/g, "\n");
      const blocks = whole.split("\n\n");
      this.buffer = blocks.pop() + held;
      const events = [];
      for (const block of blocks) {
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
          // ": keep-alive" comments and other fields carry nothing for us
        }
        if (data.length) events.push(data.join("\n"));
      }
      return events;
    }
  }

  // --- one answer -----------------------------------------------------------------------------

  function addMessage(role, text) {
    const item = el("li", "msg " + role);
    item.append(el("p", "who", role === "user" ? "You" : role === "system" ? "System" : "Answer"));
    const body = el("div", "text");
    body.dir = "auto";
    setText(body, text);
    item.append(body);
    ui.conversation.append(item);
    item.scrollIntoView({ block: "end" });
    return item;
  }

  // What the page shows under an answer: who served it, how fast, and how it moved between peers.
  class AnswerView {
    constructor(item) {
      this.item = item;
      this.textEl = item.querySelector(".text");
      this.meta = el("p", "meta");
      this.peerEl = el("span", "peer", "waiting for a peer…");
      this.ttftEl = el("span", "ttft");
      this.tpsEl = el("span", "tps");
      this.stateEl = el("span", "state");
      this.meta.append(this.peerEl, this.ttftEl, this.tpsEl, this.stateEl);
      this.notes = el("ul", "notes");
      item.append(this.meta, this.notes);
      this.text = "";
      this.peers = []; // {peer, url} in the order they served
    }

    append(piece) {
      this.text += piece;
      setText(this.textEl, this.text);
      this.item.scrollIntoView({ block: "end" });
    }

    servedBy(peer, url) {
      const last = this.peers[this.peers.length - 1];
      if (last && last.peer === peer && last.url === url) return; // the same peer named again
      this.peers.push({ peer, url });
      const names = this.peers.map((p) => shortId(p.peer) + (p.url ? " (" + p.url + ")" : ""));
      this.peerEl.textContent = "served by " + names.join(", then ");
      this.peerEl.title = this.peers.map((p) => p.peer).join(", ");
    }

    thisWorker() {
      if (this.peers.length === 0) this.peerEl.textContent = "served by this worker";
    }

    note(text, kind) {
      const item = el("li", "note " + (kind || ""), text);
      item.setAttribute("role", kind === "error" ? "alert" : "note");
      this.notes.append(item);
    }

    timing(ttftMs, tokens, tokensPerS) {
      if (ttftMs !== null) this.ttftEl.textContent = "TTFT " + Math.round(ttftMs) + " ms";
      if (tokensPerS !== null) this.tpsEl.textContent = tokensPerS.toFixed(1) + " tokens/s (" + tokens + " tokens)";
    }

    finished(how) {
      this.stateEl.textContent = how;
      this.item.dataset.state = how;
    }
  }

  function switchNote(change) {
    const from = typeof change.from === "string" ? change.from : "a peer";
    const to = typeof change.to === "string" ? change.to : "another peer";
    const reason = typeof change.reason === "string" && change.reason ? " (" + change.reason.slice(0, 200) + ")" : "";
    const resumed = Number.isInteger(change.resumed_chars) ? change.resumed_chars : 0;
    if (resumed > 0) return "Resumed on " + to + " after " + resumed + " characters: " + from + " failed" + reason + ".";
    return "Failed over from " + from + " to " + to + " before the first token" + reason + ".";
  }

  // The gateway's extension object on a chunk: who serves, a switch, and at the end a summary.
  function readExtension(ext, view) {
    if (!ext || typeof ext !== "object") return;
    if (typeof ext.peer === "string") view.servedBy(ext.peer, typeof ext.url === "string" ? ext.url : "");
    if (ext.switch && typeof ext.switch === "object") view.note(switchNote(ext.switch), "switch");
    if (Array.isArray(ext.peers)) {
      const failovers = Number.isInteger(ext.failovers) ? ext.failovers : 0;
      const resumes = Number.isInteger(ext.resumes) ? ext.resumes : 0;
      if (failovers + resumes > 0) {
        const urls = ext.peers.filter((p) => typeof p === "string");
        view.note(
          urls.length + (urls.length === 1 ? " peer" : " peers") + " served this answer: " + urls.join(", ") +
            " (" + failovers + " failover" + (failovers === 1 ? "" : "s") + ", " +
            resumes + " resume" + (resumes === 1 ? "" : "s") + ")",
          "summary",
        );
      }
    }
  }

  function number(input, fallback, low, high) {
    const value = Number(input.value);
    if (!Number.isFinite(value)) return fallback;
    return Math.min(high, Math.max(low, value));
  }

  function requestMessages() {
    const messages = [];
    const system = ui.system.value;
    if (system.trim()) messages.push({ role: "system", content: system });
    return messages.concat(state.history);
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.regenerate.disabled = busy || state.lastRequest === null;
    ui.conversation.setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function answer(messages) {
    state.lastRequest = messages;
    const item = addMessage("assistant", "");
    item.classList.add("streaming");
    const view = new AnswerView(item);
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    say("Waiting for the answer…");

    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: number(ui.temperature, 0.7, 0, 2),
      max_tokens: Math.round(number(ui.maxTokens, 256, 1, 8192)),
    };
    if (ui.model.value) body.model = ui.model.value;

    const started = performance.now();
    let first = null;
    let deltas = 0;
    let tokens = null;
    let how = "done";
    let sawExtension = false;

    const showSpeed = () => {
      const count = tokens !== null ? tokens : deltas;
      const seconds = (performance.now() - first) / 1000;
      view.timing(first - started, count, count > 1 && seconds > 0 ? (count - 1) / seconds : null);
    };

    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST",
        headers: headers(true),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) {
        const message = await errorMessage(response);
        if (response.status === 401) needKey(message);
        view.note(message, "error");
        how = "failed";
        return;
      }
      const reader = response.body.getReader();
      const events = new EventReader();
      let done = false;
      const handle = (data) => {
        if (data === "[DONE]") {
          done = true;
          return;
        }
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch (_) {
          view.note("The server sent an event that is not JSON; the answer stops here.", "error");
          how = "failed";
          done = true;
          return;
        }
        if (!chunk || typeof chunk !== "object") return;
        if (chunk.error) {
          const message = typeof chunk.error.message === "string" ? chunk.error.message : "the answer failed";
          view.note(message, "error");
          how = "failed";
          return;
        }
        if (chunk.peerinfer) {
          sawExtension = true;
          readExtension(chunk.peerinfer, view);
        } else if (!sawExtension) {
          view.thisWorker(); // a worker says nothing about peers: it served the answer itself
        }
        const choice = Array.isArray(chunk.choices) ? chunk.choices[0] : null;
        const piece = choice && choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
        if (piece) {
          if (first === null) {
            first = performance.now();
            say("Answering…");
          }
          deltas += 1;
          view.append(piece);
        }
        if (chunk.usage && Number.isInteger(chunk.usage.completion_tokens)) tokens = chunk.usage.completion_tokens;
        if (first !== null) showSpeed();
      };
      while (!done) {
        const { value, done: ended } = await reader.read();
        const datas = ended ? events.end() : events.push(value);
        for (const data of datas) if (!done) handle(data);
        if (ended) break;
      }
      if (!done && how === "done") {
        view.note("The stream ended without [DONE]: the answer may be cut.", "error");
        how = "cut";
      }
      if (done) reader.cancel().catch(() => {});
    } catch (error) {
      if (controller.signal.aborted) how = "stopped";
      else {
        view.note("The connection failed: " + String(error && error.message ? error.message : error), "error");
        how = "failed";
      }
    } finally {
      if (!sawExtension) view.thisWorker();
      if (first !== null) showSpeed();
      setText(view.textEl, view.text);
      item.classList.remove("streaming");
      view.finished(how);
      if (view.text && how !== "failed") state.history.push({ role: "assistant", content: view.text });
      state.controller = null;
      setBusy(false);
      say(how === "stopped" ? "Stopped." : how === "done" ? "" : "The answer did not finish.");
    }
  }

  function lastUserIndex() {
    for (let i = state.history.length - 1; i >= 0; i -= 1) if (state.history[i].role === "user") return i;
    return -1;
  }

  function submit() {
    if (state.controller) return;
    const text = ui.prompt.value;
    if (!text.trim()) {
      say("Type a message first.");
      return;
    }
    ui.prompt.value = "";
    addMessage("user", text);
    state.history.push({ role: "user", content: text });
    answer(requestMessages());
  }

  function regenerate() {
    if (state.controller) return;
    const last = lastUserIndex();
    if (last < 0) return;
    state.history = state.history.slice(0, last + 1);
    // Take away the answers shown after the last message of the user.
    const items = Array.from(ui.conversation.children);
    for (let i = items.length - 1; i >= 0 && items[i].classList.contains("assistant"); i -= 1) items[i].remove();
    answer(requestMessages());
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  // --- the network table ----------------------------------------------------------------------

  function cell(text, className) {
    const td = el("td", className, text);
    return td;
  }

  function fixed(value, digits, unit) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) + unit : "—";
  }

  function age(seconds) {
    if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "—";
    if (seconds < 90) return Math.round(seconds) + " s";
    return Math.round(seconds / 60) + " min";
  }

  function peerRow(peer) {
    const tr = document.createElement("tr");
    const who = el("td", "peer-cell");
    who.append(el("span", "peer-id", shortId(peer.id)), el("span", "peer-url", String(peer.url)));
    who.title = String(peer.id);
    const model = cell(String(peer.model), "model-cell");
    model.dir = "auto";
    model.title = "sha256 " + String(peer.sha256);
    const measured = fixed(peer.tokens_per_s, 1, "");
    const claimed = peer.claimed_tokens_per_s > 0 ? fixed(peer.claimed_tokens_per_s, 1, "") + " (claimed)" : "—";
    const speed = cell(measured === "—" ? claimed : measured);
    const status = peer.banned ? "avoided" : peer.last_failure ? "failed" : "ok";
    const stateCell = cell(status, "state-" + status);
    if (peer.last_failure) stateCell.title = String(peer.last_failure);
    const slots = cell(peer.slots_busy + " / " + peer.slots_free);
    slots.title = "of " + peer.slots_total + " slots";
    tr.append(
      who,
      cell(peer.verified ? "yes" : "no", peer.verified ? "verified" : "unverified"),
      model,
      slots,
      cell(String(peer.queue)),
      cell(fixed(peer.rtt_ms, 0, " ms")),
      speed,
      cell(age(peer.age_s)),
      cell(String(peer.path)),
      stateCell,
    );
    return tr;
  }

  function showMode(view) {
    state.serverMode = view.mode;
    if (view.mode === "gateway") {
      ui.mode.textContent = "the network, through a gateway";
      ui.networkSource.textContent = "Peers found through " + String(view.source) + ".";
    } else {
      ui.mode.textContent = "one worker";
      ui.networkSource.textContent = "This page talks to this worker alone.";
    }
  }

  async function refreshNetwork() {
    if (document.hidden) return;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), NETWORK_TIMEOUT_MS);
    try {
      const response = await fetch("network", { headers: headers(false), signal: controller.signal });
      if (!response.ok) {
        ui.networkStatus.textContent = "Network view unavailable: " + (await errorMessage(response));
        return;
      }
      const view = await response.json();
      if (!view || !Array.isArray(view.peers)) throw new Error("not a network view");
      showMode(view);
      ui.peers.replaceChildren(...view.peers.map(peerRow));
      if (view.peers.length === 0) {
        const tr = document.createElement("tr");
        const td = cell("No peer known yet.");
        td.colSpan = 10;
        tr.append(td);
        ui.peers.append(tr);
      }
      const count = view.peers.length;
      ui.networkStatus.textContent =
        count + " peer" + (count === 1 ? "" : "s") + ", updated " + new Date().toLocaleTimeString() + ".";
    } catch (error) {
      ui.networkStatus.textContent = "Network view unavailable: " + String(error && error.message ? error.message : error);
    } finally {
      clearTimeout(timer);
    }
  }

  async function networkLoop() {
    await refreshNetwork();
    setTimeout(networkLoop, NETWORK_EVERY_MS);
  }

  // --- wiring ---------------------------------------------------------------------------------

  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    // An input method (Hindi, Tamil...) composing a character uses Enter itself.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      submit();
    }
  });
  ui.prompt.addEventListener("input", () => {
    const lang = languageOf(ui.prompt.value);
    if (lang) ui.prompt.lang = lang;
    else ui.prompt.removeAttribute("lang");
  });
  ui.system.addEventListener("input", () => {
    const lang = languageOf(ui.system.value);
    if (lang) ui.system.lang = lang;
    else ui.system.removeAttribute("lang");
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) {
      event.preventDefault();
      stop();
    }
  });
  ui.stop.addEventListener("click", stop);
  ui.regenerate.addEventListener("click", regenerate);
  ui.newChat.addEventListener("click", () => {
    stop();
    state.history = [];
    state.lastRequest = null;
    ui.conversation.replaceChildren();
    setBusy(false);
    say("");
    ui.prompt.focus();
  });
  ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
  ui.apiKey.addEventListener("change", () => {
    const key = apiKey();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadModels();
    refreshNetwork();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refreshNetwork();
  });

  setBusy(false);
  loadModels();
  networkLoop();
})();
