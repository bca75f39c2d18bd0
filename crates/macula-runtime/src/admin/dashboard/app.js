// Macula's live dashboard. Plain JavaScript, no dependencies, served by the
// node itself (crates/macula-runtime/src/admin/dashboard.rs).
//
// Data: GET /admin/dashboard/events, a server-sent event stream of
// `snapshot` events (one DashboardReport as JSON each), read with fetch()
// so that the admin token travels in the Authorization header. The token
// comes from the URL fragment (#token=..., never sent to the server) or the
// form, and is kept in this tab's sessionStorage only. Everything a peer
// reported is put into the page as text (textContent), never as markup.
'use strict';

(function () {
  const TOKEN_KEY = 'macula-admin-token';
  const SVG = 'http://www.w3.org/2000/svg';
  const RATES = ['messages_in', 'messages_out', 'pubsub_in', 'pubsub_out', 'published', 'delivered', 'rpc_calls', 'rpc_served'];
  const $ = (id) => document.getElementById(id);

  function takeToken() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, '', location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function setConn(state, text) {
    const c = $('conn');
    c.dataset.state = state;
    c.textContent = text || state;
  }

  function askToken(why) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (why) $('auth-why').textContent = why;
    $('auth').hidden = false;
    $('main').hidden = true;
    setConn('unauthorized');
  }

  $('auth').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('auth-token').value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $('auth-token').value = '';
    $('auth').hidden = true;
    connect();
  });

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  let running = false;

  // Reads the event stream; reconnects (with a growing pause) when it ends
  // or fails, stops and asks for a token on 401.
  async function connect() {
    if (running) return;
    running = true;
    let pause = 500;
    try {
      for (;;) {
        const token = sessionStorage.getItem(TOKEN_KEY);
        if (!token) { askToken(); return; }
        try {
          const r = await fetch('/admin/dashboard/events', {
            headers: { Authorization: 'Bearer ' + token, Accept: 'text/event-stream' },
            cache: 'no-store',
          });
          if (r.status === 401) {
            const body = await r.json().catch(() => null);
            askToken('The node refused the token' + (body && body.error ? ': ' + body.error : '') + '. Paste the admin token.');
            return;
          }
          if (!r.ok || !r.body) {
            const body = await r.json().catch(() => null);
            setConn('error', 'error ' + r.status + (body && body.error ? ': ' + body.error : ''));
          } else {
            setConn('live');
            pause = 500;
            await readEvents(r.body.getReader());
            setConn('connecting', 'reconnecting');
          }
        } catch (e) {
          setConn('error', 'disconnected: ' + e.message);
        }
        await sleep(pause);
        pause = Math.min(pause * 2, 10000);
      }
    } finally {
      running = false;
    }
  }

  async function readEvents(reader) {
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true }).replace(/\r\n?/g, '\n');
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        onEvent(block);
      }
    }
  }

  function onEvent(block) {
    let event = 'message';
    const data = [];
    for (const line of block.split('\n')) {
      if (line === '' || line.startsWith(':')) continue;
      const c = line.indexOf(':');
      const field = c < 0 ? line : line.slice(0, c);
      let value = c < 0 ? '' : line.slice(c + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
    }
    if (event === 'snapshot' && data.length) {
      try {
        render(JSON.parse(data.join('\n')));
      } catch (e) {
        setConn('error', 'bad snapshot: ' + e.message);
      }
    }
  }

  // ---- rendering -------------------------------------------------------

  const short = (id) => id.slice(0, 8);
  const fmtRate = (v) => (v >= 100 ? v.toFixed(0) : v.toFixed(1));

  function fmtUptime(s) {
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm' + (s % 60) + 's';
    if (s < 86400) return Math.floor(s / 3600) + 'h' + Math.floor((s % 3600) / 60) + 'm';
    return Math.floor(s / 86400) + 'd' + Math.floor((s % 86400) / 3600) + 'h';
  }

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function render(r) {
    $('auth').hidden = true;
    $('main').hidden = false;
    $('node').textContent = r.node_id;
    $('node').title = 'the node serving this page';
    $('realm').textContent = 'realm ' + r.realm;
    $('window').textContent = String(Math.round(r.rate_window_ms / 1000));
    const peers = r.nodes.filter((n) => n.source === 'peer').length;
    const seen = r.nodes.filter((n) => n.source === 'seen').length;
    $('summary').textContent = r.nodes.length + ' nodes (' + peers + ' reporting, ' + seen +
      ' seen), ' + r.links.length + ' links';
    document.body.dataset.nodes = String(r.nodes.length);
    document.body.dataset.links = String(r.links.length);
    renderGraph(r);
    renderNodes(r);
    renderLinks(r);
    renderList($('subscriptions'), r.subscriptions.map((s) => s.pattern + (s.count > 1 ? ' ×' + s.count : '')));
    renderList($('services'), r.services.map((s) => s.procedure + ' (weight ' + s.weight + ', ' + s.available_slots + ' free)'));
    $('footer').textContent = 'updated ' + new Date().toLocaleTimeString() + ' · every ' +
      r.interval_ms + ' ms · ' + r.streams_open + '/' + r.streams_max + ' streams';
  }

  // This node at the top of a ring with the peers that report (so every
  // link between them is a visible chord), nodes only seen in their links
  // on an outer ring: the same input always draws the same.
  function layout(nodes) {
    const pos = new Map();
    const cx = 400, cy = 225;
    const ring = (list, rx, ry, turn) => list.forEach((n, i) => {
      const a = turn + (2 * Math.PI * i) / list.length - Math.PI / 2;
      pos.set(n.node_id, [cx + rx * Math.cos(a), cy + ry * Math.sin(a)]);
    });
    const inner = nodes.filter((n) => n.source !== 'seen');
    if (inner.length === 1) pos.set(inner[0].node_id, [cx, cy]);
    else ring(inner, 220, 150, 0);
    ring(nodes.filter((n) => n.source === 'seen'), 360, 205, Math.PI / 7);
    return pos;
  }

  function renderGraph(r) {
    const g = $('graph');
    g.replaceChildren();
    const pos = layout(r.nodes);
    for (const l of r.links) {
      const a = pos.get(l.a), b = pos.get(l.b);
      if (!a || !b) continue;
      const line = svg('line', {
        class: 'link ' + l.kind, x1: a[0], y1: a[1], x2: b[0], y2: b[1],
        'data-a': l.a, 'data-b': l.b, 'data-kind': l.kind,
      });
      line.appendChild(svg('title', {}, short(l.a) + ' – ' + short(l.b) + ': ' + l.kind +
        (l.relayed_via ? ' via ' + short(l.relayed_via) : '') + ', rtt ' + (l.rtt_us / 1000).toFixed(1) + ' ms'));
      g.appendChild(line);
    }
    for (const n of r.nodes) {
      const [x, y] = pos.get(n.node_id);
      const s = n.status;
      const down = s && !s.ready;
      const node = svg('g', { class: 'node ' + n.source + (down ? ' down' : ''), 'data-node-id': n.node_id });
      node.appendChild(svg('circle', { cx: x, cy: y, r: n.source === 'self' ? 18 : 14 }));
      node.appendChild(svg('text', { x: x, y: y + 34 }, short(n.node_id)));
      let sub = '';
      if (s) sub = s.clients > 0 ? s.clients + ' client' + (s.clients > 1 ? 's' : '') : '';
      if (n.refused) sub = 'refused';
      if (sub) node.appendChild(svg('text', { class: 'sub', x: x, y: y + 49 }, sub));
      node.appendChild(svg('title', {}, n.node_id + (s ? '\n' + s.addrs.join(', ') + '\n' + s.agent : '') +
        (n.refused ? '\nrefused: ' + n.refused : '')));
      g.appendChild(node);
    }
  }

  function renderNodes(r) {
    const body = $('nodes').tBodies[0];
    body.replaceChildren();
    for (const n of r.nodes) {
      const s = n.status;
      const tr = el('tr', { 'data-node-id': n.node_id, 'data-source': n.source });
      tr.appendChild(el('td', { class: 'id', title: n.node_id }, short(n.node_id)));
      tr.appendChild(el('td', { class: 'text' }, n.source));
      if (!s) {
        tr.appendChild(el('td', { class: 'text', colspan: '18' },
          n.refused ? 'refused: ' + n.refused : 'not connected to this node: no report'));
        body.appendChild(tr);
        continue;
      }
      tr.appendChild(el('td', { class: s.ready ? 'ok text' : 'bad text' },
        (s.ready ? 'ready' : 'not ready') + ', ' + s.reachability));
      tr.appendChild(el('td', {}, fmtUptime(s.uptime_secs)));
      tr.appendChild(el('td', {}, String(s.peers)));
      tr.appendChild(el('td', { 'data-clients': String(s.clients) }, String(s.clients)));
      for (const k of RATES) {
        const v = s.rates[k] || 0;
        tr.appendChild(el('td', { class: 'rate', 'data-rate': k, 'data-value': String(v) }, fmtRate(v)));
      }
      tr.appendChild(el('td', {}, String(s.dht_records)));
      tr.appendChild(el('td', {}, String(s.dht_contacts)));
      tr.appendChild(el('td', {}, String(s.dht_lookups)));
      tr.appendChild(el('td', {}, s.dht_mean_hops.toFixed(2)));
      tr.appendChild(el('td', {}, String(s.subscriptions)));
      tr.appendChild(el('td', {}, String(s.services)));
      body.appendChild(tr);
    }
  }

  function renderLinks(r) {
    const body = $('links').tBodies[0];
    body.replaceChildren();
    for (const l of r.links) {
      const tr = el('tr', { 'data-a': l.a, 'data-b': l.b, 'data-kind': l.kind });
      tr.appendChild(el('td', { class: 'id', title: l.a }, short(l.a)));
      tr.appendChild(el('td', { class: 'id text', title: l.b }, short(l.b)));
      tr.appendChild(el('td', { class: 'text' }, l.kind + (l.relayed_via ? ' via ' + short(l.relayed_via) : '')));
      tr.appendChild(el('td', {}, (l.rtt_us / 1000).toFixed(1) + ' ms'));
      tr.appendChild(el('td', { class: 'text' }, l.reported_by.map(short).join(', ')));
      body.appendChild(tr);
    }
  }

  function renderList(ul, items) {
    ul.replaceChildren();
    if (!items.length) ul.appendChild(el('li', { class: 'none' }, 'none'));
    for (const t of items) ul.appendChild(el('li', {}, t));
  }

  if (takeToken()) connect(); else askToken();
})();
