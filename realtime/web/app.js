/*
 * edtalk-live browser client: microphone in, talking face (and the delayed voice) out.
 *
 * Protocol (see realtime/server.py and realtime/protocol.py):
 *   GET  config  -> {avatars, emotions, pose_modes, ice_servers, size, family}
 *   POST offer   <- {sdp, type: "offer", avatar, emotion, intensity, pose, low_latency, paste_back}
 *                -> {sdp, type: "answer", session}   or 4xx/503 {error}
 *   data channel "control": JSON messages {type: "emotion"|"intensity"|"pose"|"pause"|"resume"|
 *                "interrupt"|"stats", ...}, each answered by {type: "ok"|"stats", for, stats}
 *                or {type: "error", error}.
 * aiortc does not trickle ICE: the offer is sent once candidate gathering is complete.
 * A server with a token secret needs a token: open the page as `/?token=<JWT>` (`edtalk-live token`);
 * it is sent as `Authorization: Bearer <JWT>` with the offer, and dropped from the address bar.
 *
 * Tests drive the page through `window.edtalk` (state, framesDecoded(), lastStats, lastError, ...).
 * Plain ES2020, no framework, no build step.
 */
"use strict";

(() => {
  const STATS_PERIOD_MS = 1000;      // server and browser statistics poll
  const ICE_GATHER_TIMEOUT_MS = 5000; // send what was gathered if gathering has not completed by then
  const INTENSITY_SEND_MS = 100;     // the slider sends at most one message per this period

  // the bearer token of `?token=...`, kept in memory only; the address bar loses it (history, screenshots)
  const TOKEN = (() => {
    const url = new URL(window.location.href);
    const token = url.searchParams.get("token");
    if (token !== null) {
      url.searchParams.delete("token");
      window.history.replaceState(null, "", url.pathname + url.search + url.hash);
    }
    return token;
  })();

  const $ = (id) => document.getElementById(id);
  const ui = {
    start: $("start"),
    pause: $("pause"),
    interrupt: $("interrupt"),
    avatar: $("avatar-select"),
    emotion: $("emotion"),
    intensity: $("intensity"),
    intensityValue: $("intensity-value"),
    pose: $("pose"),
    lowLatency: $("low-latency"),
    pasteBack: $("paste-back"),
    muteVoice: $("mute-voice"),
    video: $("avatar"),
    voice: $("voice"),
    status: $("status"),
    sessionId: $("session-id"),
  };

  // Everything about the current connection lives here (one session at a time).
  const app = {
    state: "loading",    // loading | idle | connecting | connected | failed | error
    config: null,        // the server's GET config answer
    pc: null,            // RTCPeerConnection
    mic: null,           // MediaStream of the microphone
    channel: null,       // RTCDataChannel "control"
    session: null,       // session id given by the server
    paused: false,
    lastStats: null,     // last server stats object (from any control reply)
    lastReply: null,     // last control reply (ok, stats or error)
    lastAck: null,       // last reply to anything but the stats poll (ok or error)
    lastError: null,     // last error shown in the status line
    replies: { ok: 0, stats: 0, error: 0 },
    browser: {},         // last values read from pc.getStats()
    prevSent: null,      // {frames, uptime, fps} of an earlier server stats, for the fps sent
    timer: null,         // stats poll interval
    intensityTimer: null,
    generation: 0,       // bumped on every start/stop: late callbacks of an old connection are ignored
  };

  // ------------------------------------------------------------------ status line

  function setStatus(text, kind = "info") {
    ui.status.textContent = text;
    ui.status.dataset.kind = kind;
    if (kind === "error") {
      app.lastError = text;
      console.warn("edtalk:", text);
    }
  }

  function setState(state) {
    app.state = state;
    document.body.dataset.state = state;
    const live = state === "connecting" || state === "connected";
    ui.start.textContent = live ? "Stop" : "Start";
    ui.start.disabled = state === "loading" || (state === "error" && !app.config);
    ui.pause.disabled = state !== "connected";
    ui.interrupt.disabled = state !== "connected";
    ui.lowLatency.disabled = live;
    ui.pasteBack.disabled = live;
    if (!live) {
      app.paused = false;
      ui.pause.textContent = "Pause";
    }
  }

  // ------------------------------------------------------------------ configuration

  function fillSelect(select, values, labels = {}) {
    for (const value of values) {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = labels[value] || value;
      select.append(option);
    }
  }

  async function loadConfig() {
    try {
      // with the token: a server with per-caller TURN credentials hands them only to token holders
      const response = await fetch("config", {
        cache: "no-store", headers: TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {},
      });
      if (!response.ok) throw new Error(`GET config answered ${response.status}`);
      const config = await response.json();
      app.config = config;
      fillSelect(ui.avatar, config.avatars || []);
      fillSelect(ui.emotion, config.emotions || []);
      fillSelect(ui.pose, config.pose_modes || []);
      ui.pose.value = (config.pose_modes || []).includes("idle") ? "idle" : ui.pose.value;
      const hasExpression = (config.emotions || []).length > 0;
      ui.emotion.disabled = ui.intensity.disabled = !hasExpression;
      if (!hasExpression) ui.emotion.title = ui.intensity.title = "this model has no expression control";
      setState("idle");
      setStatus(`Ready: ${config.family || "EDTalk"} model, ${config.size}×${config.size}. Press Start and speak.`);
    } catch (err) {
      setState("error");
      setStatus(`Cannot read the server configuration: ${err.message}`, "error");
    }
  }

  // ------------------------------------------------------------------ connection

  function initialOptions() {
    return {
      avatar: ui.avatar.value || undefined,
      emotion: ui.emotion.value || null,
      intensity: Number(ui.intensity.value),
      pose: ui.pose.value || undefined,
      low_latency: ui.lowLatency.checked,
      paste_back: ui.pasteBack.checked,
    };
  }

  /** Resolves once ICE gathering is complete (aiortc needs every candidate in the offer). */
  function iceGatheringComplete(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        pc.removeEventListener("icegatheringstatechange", check);
        clearTimeout(timer);
        resolve();
      };
      const check = () => { if (pc.iceGatheringState === "complete") done(); };
      const timer = setTimeout(done, ICE_GATHER_TIMEOUT_MS);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  async function start() {
    if (app.state === "connecting" || app.state === "connected") return;
    const generation = ++app.generation;
    app.lastError = null;
    app.lastStats = null;
    app.lastReply = null;
    app.lastAck = null;
    app.prevSent = null;
    app.browser = {};
    app.replies = { ok: 0, stats: 0, error: 0 };
    clearStats();
    setState("connecting");
    try {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("this page cannot use the microphone: open it over HTTPS or on localhost");
      }
      setStatus("Asking for the microphone…");
      const mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true },
      });
      if (generation !== app.generation) {          // stopped while the permission prompt was open
        for (const track of mic.getTracks()) track.stop();
        return;
      }
      app.mic = mic;

      const iceServers = (app.config && app.config.ice_servers) || [];
      const pc = new RTCPeerConnection({ iceServers });
      app.pc = pc;
      // the microphone: sendrecv, the server sends the delayed voice back on the same m-line
      for (const track of app.mic.getAudioTracks()) pc.addTrack(track, app.mic);
      // the avatar: receive only
      pc.addTransceiver("video", { direction: "recvonly" });
      // the control channel must exist before the offer so that the offer negotiates SCTP
      openControlChannel(pc.createDataChannel("control"), generation);

      pc.addEventListener("track", (event) => onTrack(event, generation));
      pc.addEventListener("connectionstatechange", () => onConnectionState(pc, generation));

      setStatus("Gathering network candidates…");
      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringComplete(pc);
      if (generation !== app.generation) return;

      setStatus("Sending the offer…");
      let response;
      try {
        response = await fetch("offer", {
          method: "POST",
          headers: { "Content-Type": "application/json", ...(TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {}) },
          body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, ...initialOptions() }),
        });
      } catch (err) {
        throw new Error(`cannot reach the server (${err.message})`);
      }
      let body = {};
      try { body = await response.json(); } catch (_) { /* not JSON: reported below */ }
      if (!response.ok) {
        throw new Error(`server refused the session (${response.status}): ${body.error || response.statusText}`);
      }
      if (generation !== app.generation) return;
      app.session = body.session || null;
      ui.sessionId.textContent = app.session ? `Session ${app.session.slice(0, 8)}.` : "";
      await pc.setRemoteDescription({ type: body.type, sdp: body.sdp });
      setStatus("Connecting…");
      app.timer = setInterval(() => pollStats(generation), STATS_PERIOD_MS);
    } catch (err) {
      if (generation !== app.generation) return;
      teardown();
      setState("failed");
      setStatus(err && err.name === "NotAllowedError"
        ? "Microphone permission was denied: allow it and press Start again."
        : `Could not start: ${err.message || err}`, "error");
    }
  }

  function onTrack(event, generation) {
    if (generation !== app.generation) return;
    const stream = new MediaStream([event.track]);
    if (event.track.kind === "video") {
      ui.video.srcObject = stream;
      ui.video.play().catch(() => { /* muted video autoplays; nothing to do */ });
    } else {
      ui.voice.srcObject = stream;
      ui.voice.muted = ui.muteVoice.checked;
      // autoplay with sound needs a user gesture: Start was one, but if the browser still refuses,
      // say so and retry on the next click. (Both tracks share one stream id in aiortc's answer, so
      // the browser keeps them in sync although they play in two elements.)
      ui.voice.play().catch(() => {
        setStatus("The browser blocked the sound: click the page to enable it.", "warn");
        document.addEventListener("click", () => ui.voice.play().catch(() => {}), { once: true });
      });
    }
  }

  function onConnectionState(pc, generation) {
    if (generation !== app.generation) return;
    switch (pc.connectionState) {
      case "connected":
        setState("connected");
        setStatus("Connected: speak into the microphone.", "ok");
        break;
      case "disconnected":
        setStatus("Connection interrupted, waiting for it to recover…", "warn");
        break;
      case "failed":
        teardown();
        setState("failed");
        setStatus("Connection failed (no network path to the server, or the server closed the session).", "error");
        break;
      case "closed":
        if (app.state === "connected" || app.state === "connecting") {
          teardown();
          setState("failed");
          setStatus("The connection was closed. Press Start to reconnect.", "error");
        }
        break;
      default:
        break;
    }
  }

  /** Stop everything of the current connection: peer connection, microphone, media elements, timers. */
  function teardown() {
    app.generation++;
    clearInterval(app.timer);
    clearTimeout(app.intensityTimer);
    app.timer = app.intensityTimer = null;
    if (app.channel) {
      try { app.channel.close(); } catch (_) { /* already closed */ }
    }
    if (app.pc) {
      try { app.pc.close(); } catch (_) { /* already closed */ }
    }
    if (app.mic) for (const track of app.mic.getTracks()) track.stop();  // releases the microphone
    app.pc = app.channel = app.mic = null;
    app.session = null;
    ui.video.srcObject = null;
    ui.voice.srcObject = null;
    ui.sessionId.textContent = "";
  }

  function stop() {
    teardown();
    setState("idle");
    setStatus("Stopped.");
  }

  // ------------------------------------------------------------------ control channel

  function openControlChannel(channel, generation) {
    app.channel = channel;
    channel.addEventListener("message", (event) => onControlReply(event.data, generation));
    channel.addEventListener("close", () => {
      // the server closes the session (inactivity, shutdown): the channel goes first
      if (generation === app.generation && app.state === "connected") {
        teardown();
        setState("failed");
        setStatus("The server closed the session. Press Start to reconnect.", "error");
      }
    });
  }

  /** Send one control message; returns false when there is no open channel. */
  function sendControl(message) {
    if (!app.channel || app.channel.readyState !== "open") return false;
    app.channel.send(JSON.stringify(message));
    return true;
  }

  function onControlReply(data, generation) {
    if (generation !== app.generation) return;
    let reply;
    try {
      reply = JSON.parse(data);
    } catch (_) {
      setStatus("The server sent a control reply that is not JSON.", "error");
      return;
    }
    app.lastReply = reply;
    if (reply.type !== "stats") app.lastAck = reply;
    if (reply.type in app.replies) app.replies[reply.type] += 1;
    if (reply.type === "error") {
      setStatus(`Server: ${reply.error}`, "error");
      return;
    }
    if (reply.stats) showServerStats(reply.stats);
    if ((reply.for === "pause" || reply.for === "resume") && reply.stats) {
      // the server's word on pausing (a stats reply still in flight may predate the click)
      app.paused = Boolean(reply.stats.paused);
      ui.pause.textContent = app.paused ? "Resume" : "Pause";
    }
    if (reply.type === "ok" && reply.for !== "stats") {
      setStatus(`Applied: ${reply.for}.`, "ok");
    }
  }

  // ------------------------------------------------------------------ statistics

  const fmt = (value, unit = "", digits = 0) =>
    value === null || value === undefined || Number.isNaN(value) ? "–" : `${Number(value).toFixed(digits)}${unit}`;

  function show(id, text) {
    $(id).textContent = text;
  }

  function clearStats() {
    for (const dd of document.querySelectorAll(".stats dd")) dd.textContent = "–";
  }

  function showServerStats(stats) {
    app.lastStats = stats;
    // frames per second actually sent, over at least half a second (acks can come moments apart)
    let fps = null;
    const prev = app.prevSent;
    if (stats.frames_sent !== undefined && (!prev || stats.uptime_s - prev.uptime >= 0.5)) {
      if (prev) fps = (stats.frames_sent - prev.frames) / (stats.uptime_s - prev.uptime);
      app.prevSent = { frames: stats.frames_sent, uptime: stats.uptime_s, fps };
    } else if (prev) {
      fps = prev.fps;
    }
    if (fps !== null) app.lastStats = { ...stats, fps_sent: fps };
    show("stat-latency-p50", fmt(stats.latency_ms_p50, " ms"));
    show("stat-latency-p95", fmt(stats.latency_ms_p95, " ms"));
    show("stat-av-offset", fmt(stats.av_offset_ms, " ms", 1));
    show("stat-delay", fmt(stats.delay_ms, " ms"));
    if (fps !== null) show("stat-fps-sent", fmt(fps, "", 1));
    show("stat-frames-sent", fmt(stats.frames_sent));
    show("stat-frames-dropped", fmt(stats.frames_dropped));
    show("stat-frames-repeated", fmt(stats.frames_repeated));
  }

  async function pollStats(generation) {
    if (generation !== app.generation || !app.pc) return;
    sendControl({ type: "stats" });
    let report;
    try {
      report = await app.pc.getStats();
    } catch (_) {
      return;   // the connection closed meanwhile
    }
    if (generation !== app.generation) return;
    const browser = {};
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") {
        browser.framesPerSecond = s.framesPerSecond;
        browser.framesDecoded = s.framesDecoded;
        browser.framesDropped = s.framesDropped;
        browser.jitter = s.jitter;             // seconds
        browser.width = s.frameWidth;
        browser.height = s.frameHeight;
        browser.codecId = s.codecId;
      } else if (s.type === "inbound-rtp" && s.kind === "audio") {
        browser.audioJitter = s.jitter;        // seconds
        browser.audioPackets = s.packetsReceived;
      } else if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") {
        browser.rtt = s.currentRoundTripTime;  // seconds
      }
    });
    const codec = browser.codecId && report.get(browser.codecId);
    browser.codec = codec ? codec.mimeType.replace(/^video\//, "") : undefined;
    app.browser = browser;
    show("stat-fps-received", fmt(browser.framesPerSecond, "", 1));
    show("stat-frames-decoded", fmt(browser.framesDecoded));
    show("stat-jitter", fmt(browser.jitter === undefined ? undefined : browser.jitter * 1000, " ms", 1));
    show("stat-resolution", browser.width ? `${browser.width}×${browser.height} ${browser.codec || ""}`.trim() : "–");
    show("stat-rtt", fmt(browser.rtt === undefined ? undefined : browser.rtt * 1000, " ms", 1));
  }

  // ------------------------------------------------------------------ controls

  ui.start.addEventListener("click", () => {
    if (app.state === "connecting" || app.state === "connected") stop();
    else start();
  });

  ui.pause.addEventListener("click", () => {
    if (sendControl({ type: app.paused ? "resume" : "pause" })) {
      app.paused = !app.paused;
      ui.pause.textContent = app.paused ? "Resume" : "Pause";
    }
  });

  ui.interrupt.addEventListener("click", () => sendControl({ type: "interrupt" }));

  ui.avatar.addEventListener("change", () => {
    // the avatar is chosen when the session starts: switching it means a new session
    if (app.state === "connected" || app.state === "connecting") {
      teardown();
      setState("idle");
      setStatus(`Switching to avatar ${ui.avatar.value}…`);
      start();
    }
  });

  ui.emotion.addEventListener("change", () => {
    sendControl({ type: "emotion", name: ui.emotion.value || null, intensity: Number(ui.intensity.value) });
  });

  ui.intensity.addEventListener("input", () => {
    ui.intensityValue.textContent = Number(ui.intensity.value).toFixed(2);
    // live, but at most one message per INTENSITY_SEND_MS while the slider moves
    if (app.intensityTimer) return;
    app.intensityTimer = setTimeout(() => {
      app.intensityTimer = null;
      sendControl({ type: "intensity", value: Number(ui.intensity.value) });
    }, INTENSITY_SEND_MS);
  });

  ui.pose.addEventListener("change", () => sendControl({ type: "pose", mode: ui.pose.value }));

  ui.muteVoice.addEventListener("change", () => { ui.voice.muted = ui.muteVoice.checked; });

  window.addEventListener("pagehide", () => teardown());   // hang up when the tab closes

  // ------------------------------------------------------------------ test / console hooks

  window.edtalk = {
    get state() { return app.state; },
    get session() { return app.session; },
    get lastStats() { return app.lastStats; },
    get lastReply() { return app.lastReply; },
    get lastAck() { return app.lastAck; },
    get lastError() { return app.lastError; },
    get replies() { return { ...app.replies }; },
    get browserStats() { return { ...app.browser }; },
    get config() { return app.config; },
    get pc() { return app.pc; },         // for debugging from the console
    /** Video frames decoded by the browser (from the last stats poll). */
    framesDecoded() { return app.browser.framesDecoded || 0; },
    start,
    stop,
    sendControl,
  };

  setState("loading");
  loadConfig();
})();
