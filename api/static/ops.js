// Rotator operations page. Plain JavaScript, no build step, no dependencies.
//
// - The API key lives in sessionStorage only (this tab), never localStorage or a cookie.
// - The list comes from GET /v1/operations and is refreshed every few seconds.
// - Each unfinished operation shown is followed live through GET /v1/operations/{id}/events.
//   EventSource cannot send an Authorization header, so the stream is read with fetch() and a
//   ReadableStream reader, and its event:/data: frames are parsed here.
// - Everything from the API is written with textContent: never innerHTML.
(() => {
  'use strict';

  const KEY_STORAGE = 'rotator.ops.apiKey';
  const REFRESH_MS = 5000;
  const LIST_LIMIT = 50;
  // A browser opens at most 6 HTTP/1.1 connections per origin, and each stream holds one:
  // keep some free for the list refresh and cancel requests. Operations beyond the cap are
  // kept up to date by the refresh.
  const MAX_STREAMS = 4;
  const CONFIRM_MS = 4000;

  const KIND_LABELS = {
    safe_migrate: 'Safe migrate',
    scheduled_rotation: 'Scheduled rotation',
    org_secret_rotation: 'Org secret rotation',
    bulk_migrate: 'Bulk migrate',
    remote_migrate: 'Remote migrate',
  };
  // A bulk migrate's children, in the order its progress bar shows them.
  const CHILD_STATES = ['succeeded', 'rolled_back', 'failed', 'canceled', 'awaiting_receiver', 'running', 'pending'];
  const STATE_LABELS = {
    pending: 'Pending',
    running: 'Running',
    awaiting_receiver: 'Awaiting receiver',
    succeeded: 'Succeeded',
    rolled_back: 'Rolled back',
    failed: 'Failed',
    canceled: 'Canceled',
    skipped: 'Skipped',
  };

  // --- DOM helpers -------------------------------------------------------------------------

  const byTestId = (id, root = document) => root.querySelector(`[data-testid="${id}"]`);

  // el('td', {class: 'x', dataset: {testid: 'y'}}, 'text', childNode, ...): text children
  // become text nodes, so nothing is ever parsed as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === 'dataset') Object.assign(node.dataset, value);
      else if (name === 'class') node.className = value;
      else if (name === 'hidden') node.hidden = Boolean(value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const ui = {};

  function bindUi() {
    for (const id of [
      'session', 'live-status', 'live-text', 'key-status', 'forget-key', 'key-panel',
      'key-form', 'key-input', 'key-error', 'ops-panel', 'summary', 'state-filter', 'refresh',
      'last-refresh', 'error-banner', 'ops-table', 'empty-state', 'empty-text',
    ]) {
      ui[id] = byTestId(id);
    }
  }

  // --- state -------------------------------------------------------------------------------

  const state = {
    key: null,
    generation: 0, // bumped whenever the key changes: late answers of the old key are dropped
    filter: '',
    ops: new Map(), // id -> operation JSON
    order: [], // ids, newest first, as the list returned them
    views: new Map(), // id -> row view
    streams: new Map(), // id -> {ctrl, connected}
    expanded: new Map(), // id -> true/false, when the operator toggled a row
    actionErrors: new Map(), // id -> message of a refused cancel
    cancelRequested: new Set(),
    refreshSeq: 0,
    refreshTimer: null,
    lastRefresh: null,
    loaded: false,
  };

  // --- key storage (sessionStorage only) ------------------------------------------------------

  function loadKey() {
    try {
      return window.sessionStorage.getItem(KEY_STORAGE);
    } catch {
      return null; // storage disabled: the key lives in memory until reload
    }
  }

  function storeKey(key) {
    try {
      if (key) window.sessionStorage.setItem(KEY_STORAGE, key);
      else window.sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      /* storage disabled */
    }
  }

  // --- API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message, requestId) {
      super(message);
      this.name = 'ApiError';
      this.status = status;
      this.code = code;
      this.requestId = requestId || null;
    }
  }

  async function errorOf(response) {
    let code = `HTTP_${response.status}`;
    let message = response.statusText || 'request failed';
    let requestId = response.headers.get('X-Request-Id');
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
        requestId = body.error.request_id || requestId;
      }
    } catch {
      /* not the JSON envelope */
    }
    return new ApiError(response.status, code, message, requestId);
  }

  async function api(path, { method = 'GET', accept = 'application/json', signal } = {}) {
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: { Authorization: `Bearer ${state.key}`, Accept: accept },
        signal,
        cache: 'no-store',
        credentials: 'omit',
        referrerPolicy: 'no-referrer',
      });
    } catch (err) {
      if (err && err.name === 'AbortError') throw err;
      throw new ApiError(0, 'NETWORK', 'cannot reach the API');
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  function describe(err) {
    if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
    if (err.status === 0) return 'Cannot reach the API. Retrying…';
    const where = err.requestId ? ` · request ${err.requestId}` : '';
    return `${err.message} (${err.status} ${err.code}${where})`;
  }

  // A 401 anywhere: the key is useless. Forget it and ask for another.
  function keyRejected(err) {
    const detail = err && err.message ? `401: ${err.message}` : '401';
    disconnect();
    showKeyPanel(`Key rejected (${detail}). Check the key and paste it again.`);
  }

  // --- SSE over fetch ----------------------------------------------------------------------

  // A Server-Sent Events parser (the WHATWG framing): lines split on CRLF, LF or CR; a blank
  // line dispatches the event; lines starting with ':' are comments (keep-alives).
  function sseParser(onEvent) {
    let buffer = '';
    let eventName = '';
    let data = [];

    function line(text) {
      if (text === '') {
        if (data.length) onEvent(eventName || 'message', data.join('\n'));
        eventName = '';
        data = [];
        return;
      }
      if (text[0] === ':') return;
      const colon = text.indexOf(':');
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? '' : text.slice(colon + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'event') eventName = value;
      else if (field === 'data') data.push(value);
      // 'id' and 'retry' are not needed: a reconnect re-reads the whole operation.
    }

    return (chunk) => {
      buffer += chunk;
      const breaks = /\r\n|\r|\n/g;
      let start = 0;
      let match;
      while ((match = breaks.exec(buffer)) !== null) {
        // A CR at the very end may be the first half of a CRLF split across chunks.
        if (match[0] === '\r' && match.index === buffer.length - 1) break;
        line(buffer.slice(start, match.index));
        start = breaks.lastIndex;
      }
      buffer = buffer.slice(start);
    };
  }

  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const feed = sseParser(onEvent);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      feed(decoder.decode(value, { stream: true }));
    }
    feed(decoder.decode());
  }

  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      if (signal) signal.addEventListener('abort', () => { clearTimeout(timer); resolve(); });
    });
  }

  function startStream(id) {
    const entry = { ctrl: new AbortController(), connected: false };
    state.streams.set(id, entry);
    followOperation(id, entry, state.generation);
  }

  function stopStream(id) {
    const entry = state.streams.get(id);
    if (!entry) return;
    state.streams.delete(id);
    entry.ctrl.abort();
    setLive(id, false);
  }

  async function followOperation(id, entry, generation) {
    const { signal } = entry.ctrl;
    let failures = 0;
    let ended = false;
    while (!signal.aborted && generation === state.generation && !ended) {
      try {
        const response = await api(`/v1/operations/${encodeURIComponent(id)}/events`, {
          accept: 'text/event-stream',
          signal,
        });
        entry.connected = true;
        setLive(id, true);
        failures = 0;
        await readEvents(response, (name, data) => {
          if (name !== 'operation' || generation !== state.generation) return;
          let operation;
          try {
            operation = JSON.parse(data);
          } catch {
            return;
          }
          applyOperation(operation);
          if (operation.finished_at) ended = true;
        });
        // The server ends the stream when the operation ends; any other end (a restart, a
        // proxy timeout) is followed by a reconnect.
      } catch (err) {
        if (signal.aborted || (err && err.name === 'AbortError')) break;
        if (err instanceof ApiError && err.status === 401) {
          keyRejected(err);
          break;
        }
        if (err instanceof ApiError && (err.status === 403 || err.status === 404)) break;
        failures += 1;
      } finally {
        entry.connected = false;
        setLive(id, false);
      }
      if (!ended) await sleep(Math.min(1000 * 2 ** failures, 15000), signal);
    }
    if (state.streams.get(id) === entry) {
      state.streams.delete(id);
      if (ended) syncStreams(); // a slot is free for another unfinished operation
    }
  }

  function syncStreams() {
    const wanted = state.order
      .filter((id) => {
        const operation = state.ops.get(id);
        return operation && !operation.finished_at;
      })
      .slice(0, MAX_STREAMS);
    for (const id of [...state.streams.keys()]) {
      if (!wanted.includes(id)) stopStream(id);
    }
    for (const id of wanted) {
      if (!state.streams.has(id)) startStream(id);
    }
    updateLiveStatus();
  }

  function stopAllStreams() {
    for (const id of [...state.streams.keys()]) stopStream(id);
  }

  // --- the list ----------------------------------------------------------------------------

  async function refresh() {
    const seq = ++state.refreshSeq;
    const generation = state.generation;
    clearTimeout(state.refreshTimer);
    const params = new URLSearchParams({ limit: String(LIST_LIMIT) });
    if (state.filter) params.set('state', state.filter);
    try {
      const response = await api(`/v1/operations?${params}`);
      const body = await response.json();
      if (seq !== state.refreshSeq || generation !== state.generation) return;
      applyList(Array.isArray(body.data) ? body.data : []);
      state.lastRefresh = Date.now();
      hideBanner();
    } catch (err) {
      if (seq !== state.refreshSeq || generation !== state.generation) return;
      if (err instanceof ApiError && err.status === 401) {
        keyRejected(err);
        return;
      }
      if (err instanceof ApiError && err.status === 403) {
        showBanner(`This key cannot read operations: ${describe(err)}. It needs webhooks:read.`);
      } else {
        showBanner(`Could not load operations: ${describe(err)}`);
      }
    } finally {
      if (seq === state.refreshSeq && generation === state.generation && state.key) {
        state.refreshTimer = setTimeout(refresh, REFRESH_MS);
      }
      tick();
    }
  }

  // Keep whichever copy is newer: a stream event may be fresher than the list page.
  function isOlder(candidate, current) {
    const a = candidate.updated_at || '';
    const b = current.updated_at || '';
    if (a.length === b.length) return a < b;
    return Date.parse(a) < Date.parse(b);
  }

  function applyList(items) {
    const ids = items.map((item) => item.id);
    const keep = new Set(ids);
    for (const item of items) {
      const current = state.ops.get(item.id);
      if (!current || !isOlder(item, current)) state.ops.set(item.id, item);
    }
    for (const id of [...state.ops.keys()]) {
      if (!keep.has(id)) {
        state.ops.delete(id);
        stopStream(id);
        removeView(id);
      }
    }
    state.order = ids;
    state.loaded = true;
    render();
    syncStreams();
  }

  function applyOperation(operation) {
    const current = state.ops.get(operation.id);
    if (!current || isOlder(operation, current)) return;
    state.ops.set(operation.id, operation);
    if (operation.finished_at) state.cancelRequested.delete(operation.id);
    const view = state.views.get(operation.id);
    if (view) updateView(view, operation);
    renderSummary();
  }

  // --- rendering ---------------------------------------------------------------------------

  const shortId = (id) => (id ? `…${id.slice(-8)}` : '—');
  const humanState = (value) => STATE_LABELS[value] || value;

  function badge(value, testid, extraClass) {
    return el(
      'span',
      { class: `badge badge-${value}${extraClass ? ` ${extraClass}` : ''}`, dataset: { testid }, title: value },
      humanState(value),
    );
  }

  function setBadge(node, value) {
    node.className = node.className.replace(/\bbadge-[a-z_]+/g, '').trim() + ` badge-${value}`;
    node.textContent = humanState(value);
    node.title = value;
  }

  function timeCell(testid) {
    const abs = el('div', { class: 'time-abs' });
    const rel = el('div', { class: 'time-rel muted', dataset: { relMode: 'past' } });
    const cell = el('td', { class: 'time', dataset: { testid } }, abs, rel);
    return { cell, abs, rel };
  }

  function setTime(parts, iso) {
    parts.abs.textContent = iso ? formatAbsolute(iso) : '—';
    parts.abs.title = iso || '';
    if (iso) parts.rel.dataset.rel = iso;
    else delete parts.rel.dataset.rel;
    parts.rel.textContent = iso ? relative(iso, 'past') : '';
  }

  function createView(id) {
    const kind = el('div', { class: 'op-kind', dataset: { testid: 'op-kind' } });
    const idLine = el('div', { class: 'op-id mono muted', dataset: { testid: 'op-id' } });
    const trigger = el('span', { class: 'chip', dataset: { testid: 'op-trigger' } });
    const stateBadge = badge('pending', 'op-state');
    const live = el('span', {
      class: 'live-dot', dataset: { testid: 'op-live' }, title: 'Streaming live', hidden: true,
    });
    const segments = el('div', { class: 'segments', dataset: { testid: 'op-progress' } });
    const progressText = el('span', { class: 'progress-text muted', dataset: { testid: 'op-progress-text' } });
    const source = el('span', { class: 'mono', dataset: { testid: 'op-source' } });
    const target = el('span', { class: 'mono', dataset: { testid: 'op-target' } });
    const provider = el('div', { class: 'op-sub', dataset: { testid: 'op-provider' } });
    const endpoints = el('td', { dataset: { testid: 'op-endpoints' } },
      el('span', { class: 'endpoints' }, source, el('span', { class: 'arrow', 'aria-hidden': 'true' }, '→'), target),
      provider);
    const created = timeCell('op-created');
    const updated = timeCell('op-updated');
    const cancel = el('button', { type: 'button', class: 'btn btn-danger btn-sm', dataset: { testid: 'op-cancel' } }, 'Cancel');
    const toggle = el('button', {
      type: 'button', class: 'btn btn-icon btn-sm', dataset: { testid: 'op-toggle' },
      'aria-expanded': 'false', 'aria-label': 'Show steps', title: 'Show steps',
    }, el('span', { class: 'chevron', 'aria-hidden': 'true' }));

    const main = el('tr', { class: 'op-row' },
      el('td', {}, kind, el('div', { class: 'op-sub' }, idLine, trigger)),
      el('td', {}, el('span', { class: 'state-cell' }, stateBadge, live)),
      el('td', {}, el('div', { class: 'progress' }, segments, progressText)),
      endpoints,
      created.cell,
      updated.cell,
      el('td', { class: 'actions' }, cancel, toggle),
    );

    // The detail row: the refused-cancel message, the operation error, facts, and the steps.
    const actionError = el('div', { class: 'callout callout-warn', role: 'alert', dataset: { testid: 'op-action-error' }, hidden: true });
    const opError = el('div', { class: 'callout callout-error', dataset: { testid: 'op-error' }, hidden: true });
    const facts = el('dl', { class: 'facts' });
    const stepsBody = el('tbody');
    const steps = el('table', { class: 'steps', dataset: { testid: 'op-steps' } },
      el('thead', {}, el('tr', {},
        el('th', { scope: 'col' }, 'Step'),
        el('th', { scope: 'col' }, 'State'),
        el('th', { scope: 'col', class: 'num' }, 'Attempts'),
        el('th', { scope: 'col' }, 'Started'),
        el('th', { scope: 'col' }, 'Next attempt'),
        el('th', { scope: 'col' }, 'Last error'))),
      stepsBody);
    const detailCell = el('td', { colspan: '7' },
      el('div', { class: 'detail' }, actionError, opError,
        el('div', { class: 'detail-grid' }, facts, el('div', { class: 'steps-wrap' }, steps))));
    const detail = el('tr', { class: 'op-detail', hidden: true }, detailCell);

    const tbody = el('tbody', { class: 'op', dataset: { testid: 'op', opId: id } }, main, detail);
    const view = {
      id, tbody, main, detail, kind, idLine, trigger, stateBadge, live, segments, progressText,
      source, target, provider, created, updated, cancel, toggle, actionError, opError, facts, stepsBody,
      stepRows: [], signature: null, confirmTimer: null, confirming: false, busy: false,
    };

    toggle.addEventListener('click', () => {
      state.expanded.set(id, !isExpanded(view));
      renderExpanded(view);
    });
    main.addEventListener('click', (event) => {
      if (event.target.closest('button')) return;
      if (String(window.getSelection() || '')) return; // selecting an id to copy it
      state.expanded.set(id, !isExpanded(view));
      renderExpanded(view);
    });
    cancel.addEventListener('click', () => onCancel(view));
    state.views.set(id, view);
    return view;
  }

  function removeView(id) {
    const view = state.views.get(id);
    if (!view) return;
    clearTimeout(view.confirmTimer);
    view.tbody.remove();
    state.views.delete(id);
  }

  function isExpanded(view) {
    if (state.expanded.has(view.id)) return state.expanded.get(view.id);
    if (state.actionErrors.has(view.id)) return true;
    const operation = state.ops.get(view.id);
    return Boolean(operation && !operation.finished_at); // unfinished: open by default
  }

  function renderExpanded(view) {
    const open = isExpanded(view);
    view.detail.hidden = !open;
    view.tbody.classList.toggle('is-open', open);
    view.toggle.setAttribute('aria-expanded', String(open));
    const label = open ? 'Hide steps' : 'Show steps';
    view.toggle.setAttribute('aria-label', label);
    view.toggle.title = label;
  }

  function updateView(view, operation) {
    const signature = JSON.stringify(operation);
    if (signature !== view.signature) {
      view.signature = signature;
      view.tbody.dataset.state = operation.state;
      view.tbody.dataset.kind = operation.kind;
      view.kind.textContent = KIND_LABELS[operation.kind] || operation.kind;
      view.idLine.textContent = shortId(operation.id);
      view.idLine.title = operation.id;
      view.trigger.textContent = operation.trigger;
      view.trigger.title = operation.trigger === 'schedule' ? 'started by a rotation policy' : 'started through the API';
      setBadge(view.stateBadge, operation.state);
      renderProgress(view, operation);
      renderEndpoints(view, operation);
      setTime(view.created, operation.created_at);
      setTime(view.updated, operation.updated_at);
      renderFacts(view, operation);
      renderSteps(view, operation);
      if (operation.error) {
        view.opError.hidden = false;
        view.opError.replaceChildren(
          el('span', { class: 'callout-title' }, 'Operation error'),
          el('code', { class: 'callout-code' }, operation.error.code || 'ERROR'),
          el('span', {}, operation.error.message || ''),
        );
      } else {
        view.opError.hidden = true;
        view.opError.replaceChildren();
      }
    }
    renderCancel(view, operation);
    renderActionError(view);
    renderExpanded(view);
  }

  function renderChildrenProgress(view, operation) {
    // One segment per child, grouped by state: the bar of a bulk migrate is its children.
    const counts = operation.children;
    const cells = [];
    for (const state of CHILD_STATES) {
      const segment = state === 'awaiting_receiver' ? 'waiting'
        : state === 'rolled_back' || state === 'canceled' ? 'skipped' : state;
      for (let i = 0; i < (counts[state] || 0); i += 1) {
        cells.push(el('span', {
          class: `segment segment-${segment}`,
          title: `${counts[state]} ${STATE_LABELS[state] || state}`,
          dataset: { testid: 'child-segment', state },
        }));
      }
    }
    view.segments.classList.add('segments-children');
    view.segments.replaceChildren(...cells);
    const ended = counts.succeeded + counts.rolled_back + counts.failed + counts.canceled;
    view.progressText.textContent = `${ended}/${counts.total}`;
  }

  function renderProgress(view, operation) {
    if (operation.children) {
      renderChildrenProgress(view, operation);
      return;
    }
    const steps = operation.steps || [];
    const cells = steps.map((step) => {
      const waiting = step.state === 'running' && operation.state === 'awaiting_receiver';
      return el('span', {
        class: `segment segment-${waiting ? 'waiting' : step.state}`,
        title: `${step.name}: ${step.state}`,
      });
    });
    view.segments.replaceChildren(...cells);
    // Skipped steps count as done only when the operation succeeded; after a roll back they
    // are the part that never happened.
    const done = steps.filter((step) => step.state === 'succeeded' ||
      (step.state === 'skipped' && operation.state === 'succeeded')).length;
    view.progressText.textContent = steps.length ? `${done}/${steps.length}` : '—';
  }

  function renderEndpoints(view, operation) {
    view.provider.textContent = '';
    if (operation.children) {
      view.source.textContent = `${operation.children.total} endpoints`;
      view.source.title = '';
      view.target.textContent = '';
      view.target.parentElement.classList.add('single');
      return;
    }
    if (!operation.source_endpoint_id && !operation.new_endpoint_id) {
      view.source.textContent = operation.kind === 'org_secret_rotation' ? 'organization secret' : '—';
      view.source.title = '';
      view.target.textContent = '';
      view.target.parentElement.classList.add('single');
      return;
    }
    view.target.parentElement.classList.remove('single');
    view.source.textContent = shortId(operation.source_endpoint_id);
    view.source.title = operation.source_endpoint_id ? `old endpoint ${operation.source_endpoint_id}` : '';
    view.target.textContent = operation.new_endpoint_id ? shortId(operation.new_endpoint_id) : 'not yet created';
    view.target.classList.toggle('muted', !operation.new_endpoint_id);
    view.target.title = operation.new_endpoint_id ? `new endpoint ${operation.new_endpoint_id}` : '';
    if (operation.provider_id) {
      view.provider.textContent = `at ${providerName(operation.provider_id)}`;
      view.source.title += ` at provider ${operation.provider_id}`;
    }
  }

  // A remote migrate names its provider: names are fetched once per provider and page.
  const providerNames = new Map();
  function providerName(id) {
    if (!providerNames.has(id)) {
      providerNames.set(id, shortId(id));
      api(`/v1/providers/${encodeURIComponent(id)}`)
        .then((response) => response.json())
        .then((provider) => {
          providerNames.set(id, provider.name);
          for (const view of state.views.values()) {
            if (state.ops.get(view.id)?.provider_id === id) {
              view.provider.textContent = `at ${provider.name}`;
            }
          }
        })
        .catch(() => {}); // a deleted provider keeps its short id
    }
    return providerNames.get(id);
  }

  function fact(label, value, testid, options = {}) {
    const dd = el('dd', { class: options.mono ? 'mono' : undefined, dataset: testid ? { testid } : undefined });
    if (value instanceof Node) dd.append(value);
    else if (value === null || value === undefined || value === '') dd.textContent = '—';
    else {
      dd.textContent = String(value);
      dd.title = String(value);
    }
    return [el('dt', {}, label), dd];
  }

  function timeFact(iso, mode) {
    if (!iso) return '—';
    return el('span', { title: iso },
      formatAbsolute(iso), ' ',
      el('span', { class: 'muted', dataset: { rel: iso, relMode: mode } }, `(${relative(iso, mode)})`));
  }

  function renderFacts(view, operation) {
    view.facts.replaceChildren(
      ...fact('Operation', operation.id, 'fact-id', { mono: true }),
      ...fact('Old endpoint', operation.source_endpoint_id, 'fact-source', { mono: true }),
      ...fact('New endpoint', operation.new_endpoint_id, 'fact-target', { mono: true }),
      ...(operation.policy_id ? fact('Policy', operation.policy_id, 'fact-policy', { mono: true }) : []),
      ...(operation.children ? fact('Children', CHILD_STATES
        .filter((state) => operation.children[state])
        .map((state) => `${operation.children[state]} ${STATE_LABELS[state] || state}`)
        .join(', ') || '—', 'fact-children') : []),
      ...fact('Deadline', operation.finished_at ? timeFact(operation.deadline_at, 'past') : timeFact(operation.deadline_at, 'future'), 'fact-deadline'),
      ...fact('Finished', timeFact(operation.finished_at, 'past'), 'fact-finished'),
    );
  }

  function renderSteps(view, operation) {
    const steps = operation.steps || [];
    while (view.stepRows.length > steps.length) view.stepRows.pop().row.remove();
    steps.forEach((step, index) => {
      let cells = view.stepRows[index];
      if (!cells) {
        const name = el('span', { class: 'mono' });
        const stepState = badge('pending', 'step-state', 'badge-sm');
        const attempts = el('td', { class: 'num', dataset: { testid: 'step-attempts' } });
        const started = el('td', { class: 'muted', dataset: { testid: 'step-started' } });
        const next = el('td', { dataset: { testid: 'step-next' } });
        const error = el('td', { class: 'step-error', dataset: { testid: 'step-error' } });
        const row = el('tr', { dataset: { testid: 'step' } },
          el('td', {}, el('span', { class: 'step-index' }, String(index + 1)), name),
          el('td', {}, stepState), attempts, started, next, error);
        view.stepsBody.append(row);
        cells = { row, name, stepState, attempts, started, next, error };
        view.stepRows[index] = cells;
      }
      cells.row.dataset.step = step.name;
      cells.row.dataset.state = step.state;
      cells.name.textContent = step.name;
      setBadge(cells.stepState, step.state);
      cells.attempts.textContent = String(step.attempts ?? 0);
      cells.started.textContent = step.started_at ? formatAbsolute(step.started_at) : '—';
      cells.started.title = step.started_at || '';
      const waiting = !operation.finished_at && step.next_attempt_at &&
        (step.state === 'running' || step.state === 'pending');
      if (waiting) {
        cells.next.dataset.rel = step.next_attempt_at;
        cells.next.dataset.relMode = 'next';
        cells.next.textContent = relative(step.next_attempt_at, 'next');
        cells.next.title = step.next_attempt_at;
        cells.next.className = 'next-attempt';
      } else {
        delete cells.next.dataset.rel;
        cells.next.textContent = '—';
        cells.next.title = step.next_attempt_at || '';
        cells.next.className = 'muted';
      }
      cells.error.textContent = step.last_error || '';
      cells.error.title = step.last_error || '';
      // An error on a step that then succeeded is history, not a problem.
      cells.error.classList.toggle('is-stale', step.state === 'succeeded');
    });
  }

  function renderCancel(view, operation) {
    const button = view.cancel;
    if (operation.finished_at) {
      button.hidden = true;
      resetConfirm(view);
      return;
    }
    button.hidden = false;
    if (view.busy) {
      button.disabled = true;
      button.textContent = 'Canceling…';
    } else if (state.cancelRequested.has(operation.id)) {
      button.disabled = true;
      button.textContent = 'Cancel requested';
      button.title = 'The workers roll the operation back at its next step';
    } else {
      button.disabled = false;
      button.textContent = view.confirming ? 'Confirm cancel' : 'Cancel';
      button.classList.toggle('is-confirming', view.confirming);
      button.title = view.confirming ? 'Click again to roll back: the new endpoint is deleted, the old one stays' : 'Roll the operation back';
    }
  }

  function renderActionError(view) {
    const message = state.actionErrors.get(view.id);
    view.actionError.hidden = !message;
    if (message) {
      view.actionError.replaceChildren(el('span', { class: 'callout-title' }, 'Cancel refused'), el('span', {}, message));
    } else {
      view.actionError.replaceChildren();
    }
  }

  function resetConfirm(view) {
    clearTimeout(view.confirmTimer);
    view.confirming = false;
    view.cancel.classList.remove('is-confirming');
  }

  async function onCancel(view) {
    const operation = state.ops.get(view.id);
    if (!operation || operation.finished_at || view.busy) return;
    if (!view.confirming) {
      view.confirming = true;
      view.confirmTimer = setTimeout(() => {
        resetConfirm(view);
        renderCancel(view, state.ops.get(view.id) || operation);
      }, CONFIRM_MS);
      renderCancel(view, operation);
      return;
    }
    resetConfirm(view);
    view.busy = true;
    state.actionErrors.delete(view.id);
    renderActionError(view);
    renderCancel(view, operation);
    const generation = state.generation;
    try {
      const response = await api(`/v1/operations/${encodeURIComponent(view.id)}/cancel`, { method: 'POST' });
      const updated = await response.json();
      if (generation !== state.generation) return;
      if (!updated.finished_at) state.cancelRequested.add(view.id);
      view.busy = false;
      applyOperation(updated);
    } catch (err) {
      if (generation !== state.generation) return;
      view.busy = false;
      if (err instanceof ApiError && err.status === 401) {
        keyRejected(err);
        return;
      }
      if (err instanceof ApiError && err.status === 403) {
        state.actionErrors.set(view.id, `this key cannot cancel operations (it needs webhooks:write). ${describe(err)}`);
      } else {
        state.actionErrors.set(view.id, describe(err));
      }
      refresh(); // the operation has probably moved on: show where it is now
    }
    const current = state.ops.get(view.id);
    if (current && state.views.get(view.id) === view) updateView(view, current);
  }

  function render() {
    const table = ui['ops-table'];
    state.order.forEach((id, index) => {
      const operation = state.ops.get(id);
      const view = state.views.get(id) || createView(id);
      updateView(view, operation);
      const at = table.tBodies[index];
      if (at !== view.tbody) table.insertBefore(view.tbody, at || null);
    });
    ui['empty-state'].hidden = !(state.loaded && state.order.length === 0);
    ui['empty-text'].textContent = state.filter
      ? `No operation is ${humanState(state.filter).toLowerCase()}.`
      : 'Start one with POST /v1/webhooks/{id}/migrate, or let a rotation policy start one.';
    renderSummary();
  }

  function renderSummary() {
    if (!state.loaded) {
      ui.summary.textContent = 'Loading…';
      return;
    }
    const total = state.order.length;
    const active = state.order.filter((id) => {
      const operation = state.ops.get(id);
      return operation && !operation.finished_at;
    }).length;
    const scope = state.filter ? ` ${humanState(state.filter).toLowerCase()}` : '';
    const noun = total === 1 ? 'operation' : 'operations';
    const cap = total >= LIST_LIMIT ? ` (the ${LIST_LIMIT} newest)` : '';
    ui.summary.textContent = `${total}${scope} ${noun}${cap} · ${active} in progress`;
  }

  function setLive(id, on) {
    const view = state.views.get(id);
    if (view) view.live.hidden = !on;
    updateLiveStatus();
  }

  function updateLiveStatus() {
    const connected = [...state.streams.values()].filter((entry) => entry.connected).length;
    ui['live-status'].dataset.live = String(connected > 0);
    ui['live-text'].textContent = connected > 0
      ? `Live · ${connected} ${connected === 1 ? 'stream' : 'streams'}`
      : `Polling every ${REFRESH_MS / 1000}s`;
  }

  // --- banner ------------------------------------------------------------------------------

  function showBanner(message) {
    ui['error-banner'].textContent = message;
    ui['error-banner'].hidden = false;
  }

  function hideBanner() {
    ui['error-banner'].hidden = true;
    ui['error-banner'].textContent = '';
  }

  // --- time --------------------------------------------------------------------------------

  const timeFormat = new Intl.DateTimeFormat(undefined, {
    hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
  });
  const dateFormat = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

  function formatAbsolute(iso) {
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return iso;
    const today = new Date();
    const sameDay = date.toDateString() === today.toDateString();
    return sameDay ? timeFormat.format(date) : `${dateFormat.format(date)}, ${timeFormat.format(date)}`;
  }

  function span(ms) {
    const seconds = Math.round(Math.abs(ms) / 1000);
    if (seconds < 60) return `${seconds}s`;
    const minutes = Math.floor(seconds / 60);
    if (minutes < 10) return `${minutes}m ${seconds % 60}s`;
    if (minutes < 60) return `${minutes}m`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return `${hours}h ${minutes % 60}m`;
    return `${Math.floor(hours / 24)}d`;
  }

  // mode 'past': "12s ago"; 'future': "in 12s" (or "12s ago"); 'next': a retry time, "in 12s",
  // "due now" or "overdue 12s".
  function relative(iso, mode) {
    const at = Date.parse(iso);
    if (Number.isNaN(at)) return '';
    const delta = at - Date.now();
    if (mode === 'next') {
      if (delta > 500) return `in ${span(delta)}`;
      if (delta > -2000) return 'due now';
      return `overdue ${span(delta)}`;
    }
    if (Math.abs(delta) < 1500) return 'just now';
    return delta > 0 ? `in ${span(delta)}` : `${span(delta)} ago`;
  }

  function tick() {
    for (const node of document.querySelectorAll('[data-rel]')) {
      const text = relative(node.dataset.rel, node.dataset.relMode || 'past');
      node.textContent = node.closest('.facts') ? `(${text})` : text;
    }
    ui['last-refresh'].textContent = state.lastRefresh
      ? `Updated ${relative(new Date(state.lastRefresh).toISOString(), 'past')}`
      : '';
  }

  // --- connecting --------------------------------------------------------------------------

  function showKeyPanel(error) {
    ui['ops-panel'].hidden = true;
    ui.session.hidden = true;
    ui['key-panel'].hidden = false;
    ui['key-error'].hidden = !error;
    ui['key-error'].textContent = error || '';
    ui['key-input'].value = '';
    ui['key-input'].focus();
  }

  function disconnect() {
    state.generation += 1;
    clearTimeout(state.refreshTimer);
    stopAllStreams();
    for (const id of [...state.views.keys()]) removeView(id);
    state.key = null;
    state.ops.clear();
    state.order = [];
    state.expanded.clear();
    state.actionErrors.clear();
    state.cancelRequested.clear();
    state.lastRefresh = null;
    state.loaded = false;
    storeKey(null);
    hideBanner();
    updateLiveStatus();
  }

  function connect(key) {
    disconnect();
    state.key = key;
    storeKey(key);
    ui['key-panel'].hidden = true;
    ui['key-error'].hidden = true;
    ui['ops-panel'].hidden = false;
    ui.session.hidden = false;
    ui['key-status'].textContent = `${key.slice(0, 12)}…`;
    render();
    refresh();
  }

  function onKeySubmit(event) {
    event.preventDefault();
    const key = ui['key-input'].value.trim().replace(/^bearer\s+/i, '');
    ui['key-input'].value = ''; // the key is not left in the DOM
    if (!key) {
      showKeyPanel('Paste an API key first.');
      return;
    }
    connect(key);
  }

  function start() {
    bindUi();
    ui['key-form'].addEventListener('submit', onKeySubmit);
    ui['forget-key'].addEventListener('click', () => {
      disconnect();
      showKeyPanel(null);
    });
    ui['state-filter'].addEventListener('change', () => {
      state.filter = ui['state-filter'].value;
      state.loaded = false;
      refresh();
    });
    ui.refresh.addEventListener('click', () => refresh());
    setInterval(tick, 1000);
    const key = loadKey();
    if (key) connect(key);
    else showKeyPanel(null);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
