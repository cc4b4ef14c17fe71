// Estable's web page: plain JavaScript, no framework, no build step, nothing fetched from anywhere but this
// server. It speaks Estable's own API (/v1/...): POST /v1/jobs, the job's server-sent events (or polling),
// GET /v1/jobs for the history. With an API key on the server, a 401 asks for the key once; the key stays in
// sessionStorage and goes out as a Bearer header on every request; images are then fetched with that header and
// shown through blob: URLs.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = 'estable.apiKey';
  const FORM_STORE = 'estable.form';
  const PAGE = 12;
  const FINAL = new Set(['done', 'failed', 'cancelled', 'interrupted']);
  const MAX_INPUT_SIDE = 2048;

  const state = {
    config: null,
    samplers: [],
    running: null, // id of the job this page is generating
    galleryOffset: 0,
    galleryTotal: 0,
    cards: new Map(), // job id -> <li>
    watched: new Set(), // job ids with a watcher
    hasImage: false,
    controlImage: null, // base64 PNG/JPEG of the ControlNet image
  };

  // ---------------------------------------------------------------- HTTP with the API key -------------------
  const apiKey = () => sessionStorage.getItem(KEY_STORE) || '';
  const apiUrl = (path) => new URL(String(path).replace(/^\//, ''), document.baseURI).href;
  let keyPrompt = null; // one dialog for every request that met a 401 at the same time

  function askKey(rejected) {
    if (keyPrompt) return keyPrompt;
    const dialog = $('key-dialog');
    $('key-error').hidden = !rejected;
    $('api-key').value = '';
    keyPrompt = new Promise((resolve) => {
      const done = (ev) => {
        ev.preventDefault();
        const key = $('api-key').value.trim();
        if (!key) return;
        sessionStorage.setItem(KEY_STORE, key);
        $('key-form').removeEventListener('submit', done);
        dialog.close();
        keyPrompt = null;
        $('forget-key').hidden = false;
        resolve();
      };
      $('key-form').addEventListener('submit', done);
      dialog.addEventListener('cancel', (ev) => ev.preventDefault()); // no way on without a key
      dialog.showModal();
      $('api-key').focus();
    });
    return keyPrompt;
  }

  async function api(path, opts = {}) {
    for (;;) {
      const key = apiKey();
      const headers = new Headers(opts.headers || {});
      if (key) headers.set('Authorization', `Bearer ${key}`);
      const res = await fetch(apiUrl(path), { ...opts, headers });
      if (res.status !== 401) return res;
      if (key) sessionStorage.removeItem(KEY_STORE);
      await askKey(Boolean(key));
    }
  }

  async function apiError(res) {
    let msg = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      const d = body.detail ?? body.error ?? body.message;
      if (typeof d === 'string') msg = d;
      else if (Array.isArray(d)) {
        msg = d.map((e) => {
          const loc = Array.isArray(e.loc) ? e.loc.filter((x) => x !== 'body').join('.') : '';
          return (loc ? `${loc}: ` : '') + (e.msg || JSON.stringify(e));
        }).join('; ');
      }
    } catch (_) { /* not JSON: keep the status line */ }
    if (res.status === 503) {
      const after = res.headers.get('Retry-After');
      msg = `The server is busy: ${msg}${after ? ` (try again in ${after} s)` : ''}`;
    } else if (res.status === 413) {
      msg = `The request is too large for this server: ${msg}`;
    }
    const err = new Error(msg);
    err.status = res.status;
    return err;
  }

  async function apiJSON(path, opts) {
    const res = await api(path, opts);
    if (!res.ok) throw await apiError(res);
    return res.json();
  }

  // Without a key the browser loads images itself (and caches them); with one, fetch them with the header.
  async function imageSrc(url) {
    if (!apiKey()) return apiUrl(url);
    const res = await api(url);
    if (!res.ok) throw await apiError(res);
    return URL.createObjectURL(await res.blob());
  }

  const previewSrc = (b64) => (b64.startsWith('data:') ? b64 : `data:image/png;base64,${b64}`);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ---------------------------------------------------------------- status line ------------------------------
  function status(text, kind = '') {
    const el = $('status');
    el.textContent = text;
    el.className = `status ${kind}`;
  }

  // ---------------------------------------------------------------- the form ---------------------------------
  const FIELDS = {
    prompt: 'prompt', negative_prompt: 'negative-prompt', sampler: 'sampler', steps: 'steps',
    cfg_scale: 'cfg-scale', cfg_start: 'cfg-start', seed: 'seed', width: 'width', height: 'height',
    batch_size: 'batch-size', strength: 'strength', control: 'control-model',
  };

  const mode = () => document.querySelector('input[name="mode"]:checked').value;

  function setMode(m) {
    const radio = $(`mode-${m}`);
    if (radio) radio.checked = true;
    updateMode();
  }

  function updateMode() {
    const m = mode();
    $('image-section').hidden = m === 'txt2img';
    const inpaint = m === 'inpaint';
    $('mask-tools').hidden = !inpaint || !state.hasImage;
    $('mask-hint').hidden = !inpaint;
    $('mask-canvas').classList.toggle('active', inpaint);
    $('mask-canvas').hidden = !inpaint;
  }

  function saveForm() {
    const data = { mode: mode() };
    for (const [key, id] of Object.entries(FIELDS)) data[key] = $(id).value;
    try { localStorage.setItem(FORM_STORE, JSON.stringify(data)); } catch (_) { /* storage off */ }
  }

  function selectSampler(name) {
    if (name == null) return;
    const want = String(name).toLowerCase();
    const hit = state.samplers.find((s) => s.name.toLowerCase() === want || (s.label || '').toLowerCase() === want);
    if (hit) $('sampler').value = hit.name;
  }

  // Fill the form from a parameter object (a saved form, a job's params, the server's defaults).
  function applyParams(p) {
    for (const [key, id] of Object.entries(FIELDS)) {
      if (p[key] === undefined || p[key] === null) continue;
      if (key === 'sampler') selectSampler(p[key]);
      else $(id).value = p[key];
    }
    if (typeof p.complete_prompt === 'boolean') $('complete-prompt').checked = p.complete_prompt;
    $('strength-value').textContent = Number($('strength').value).toFixed(2);
    if (p.mode) setMode(p.mode);
  }

  function intField(id, label, min, max) {
    const raw = $(id).value.trim();
    const v = Number(raw);
    if (raw === '' || !Number.isInteger(v)) throw fieldError(id, `${label} must be a whole number`);
    if ((min !== undefined && v < min) || (max !== undefined && v > max)) {
      throw fieldError(id, `${label} must be between ${min} and ${max}`);
    }
    return v;
  }

  function fieldError(id, msg) {
    const el = $(id);
    el.setAttribute('aria-invalid', 'true');
    el.focus();
    return new Error(msg);
  }

  function readForm() {
    for (const el of document.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
    const lim = (state.config && state.config.limits) || {};
    const m = mode();
    const body = {
      mode: m,
      prompt: $('prompt').value,
      negative_prompt: $('negative-prompt').value,
      sampler: $('sampler').value || undefined,
      steps: intField('steps', 'Steps', 1, lim.max_steps || 1000),
      cfg_scale: Number($('cfg-scale').value),
      cfg_start: Number($('cfg-start').value || 0),
      seed: intField('seed', 'Seed', -1, Number.MAX_SAFE_INTEGER),
      width: intField('width', 'Width', 8, lim.max_width || 2048),
      height: intField('height', 'Height', 8, lim.max_height || 2048),
      batch_size: intField('batch-size', 'Batch', 1, lim.max_batch_size || 16),
    };
    // the model file's prompt completion (shown only for a model that names one): off = the prompt as written
    if (!$('complete-prompt-row').hidden) body.complete_prompt = $('complete-prompt').checked;
    if (!Number.isFinite(body.cfg_scale)) throw fieldError('cfg-scale', 'Guidance must be a number');
    if (!(body.cfg_start >= 0 && body.cfg_start < 1)) {
      throw fieldError('cfg-start', 'CFG start must be at least 0 and below 1');
    }
    for (const side of ['width', 'height']) {
      if (body[side] % 8) throw fieldError(side, `${side} must be a multiple of 8 (try ${body[side] - (body[side] % 8) || 8})`);
    }
    if (lim.max_prompt_length && body.prompt.length > lim.max_prompt_length) {
      throw fieldError('prompt', `The prompt is longer than ${lim.max_prompt_length} characters`);
    }
    if ($('control-model').value) {
      if (!state.controlImage) throw fieldError('control-image', 'Choose an image for the ControlNet first');
      const scale = Number($('control-scale').value);
      if (!(scale >= 0 && scale <= 10)) throw fieldError('control-scale', 'The ControlNet weight must be 0 to 10');
      body.control = [{ type: $('control-type').value, image: state.controlImage, model: $('control-model').value,
        scale }];
    }
    if (m !== 'txt2img') {
      if (!state.hasImage) throw fieldError('init-image', 'Choose an input image first');
      body.strength = Number($('strength').value);
      body.init_image = $('image-canvas').toDataURL('image/png').split(',')[1];
      if (m === 'inpaint') {
        const mask = exportMask();
        if (!mask) throw new Error('Paint the part of the image to repaint first (the mask is empty)');
        body.mask = mask;
      }
    }
    return body;
  }

  // ---------------------------------------------------------------- input image and mask ----------------------
  function loadInputImage(source, width, height) {
    const scale = Math.min(1, MAX_INPUT_SIDE / Math.max(width, height));
    const w = Math.max(8, Math.round(width * scale));
    const h = Math.max(8, Math.round(height * scale));
    const img = $('image-canvas');
    const mask = $('mask-canvas');
    img.width = mask.width = w;
    img.height = mask.height = h;
    img.getContext('2d').drawImage(source, 0, 0, w, h);
    mask.getContext('2d').clearRect(0, 0, w, h);
    state.hasImage = true;
    $('canvas-wrap').hidden = false;
    $('use-image-size').disabled = false;
    updateMode();
  }

  async function onImageFile() {
    const file = $('init-image').files[0];
    if (!file) return;
    try {
      const bitmap = await createImageBitmap(file);
      loadInputImage(bitmap, bitmap.width, bitmap.height);
      bitmap.close();
      status(`Input image: ${file.name}`);
    } catch (_) {
      status(`Could not read ${file.name} as an image`, 'error');
    }
  }

  async function imageToInput(url) {
    const res = await api(url);
    if (!res.ok) throw await apiError(res);
    const bitmap = await createImageBitmap(await res.blob());
    loadInputImage(bitmap, bitmap.width, bitmap.height);
    bitmap.close();
    if (mode() === 'txt2img') setMode('img2img');
    $('image-section').scrollIntoView({ behavior: 'smooth', block: 'nearest' });
  }

  // The mask canvas holds the strokes (any opaque pixel is "repaint"); the user sees them tinted over the image.
  function setupBrush() {
    const canvas = $('mask-canvas');
    const ctx = canvas.getContext('2d');
    let last = null;
    const point = (ev) => {
      const r = canvas.getBoundingClientRect();
      return {
        x: ((ev.clientX - r.left) * canvas.width) / r.width,
        y: ((ev.clientY - r.top) * canvas.height) / r.height,
        scale: canvas.width / r.width,
      };
    };
    const stroke = (a, b) => {
      ctx.globalCompositeOperation = $('eraser').checked ? 'destination-out' : 'source-over';
      ctx.strokeStyle = ctx.fillStyle = 'rgb(255, 48, 96)';
      ctx.lineWidth = Number($('brush-size').value) * b.scale;
      ctx.lineCap = ctx.lineJoin = 'round';
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x + 0.01, b.y);
      ctx.stroke();
    };
    canvas.addEventListener('pointerdown', (ev) => {
      if (mode() !== 'inpaint' || !state.hasImage) return;
      canvas.setPointerCapture(ev.pointerId);
      last = point(ev);
      stroke(last, last);
      ev.preventDefault();
    });
    canvas.addEventListener('pointermove', (ev) => {
      if (!last) return;
      const p = point(ev);
      stroke(last, p);
      last = p;
    });
    const end = () => { last = null; };
    canvas.addEventListener('pointerup', end);
    canvas.addEventListener('pointercancel', end);
    $('mask-clear').addEventListener('click', () => ctx.clearRect(0, 0, canvas.width, canvas.height));
    $('mask-invert').addEventListener('click', () => {
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
      const px = data.data;
      for (let i = 0; i < px.length; i += 4) {
        const on = px[i + 3] >= 128;
        px[i] = 255; px[i + 1] = 48; px[i + 2] = 96; px[i + 3] = on ? 0 : 255;
      }
      ctx.putImageData(data, 0, 0);
    });
  }

  // Black and white PNG at the input image's size, white = repaint; null when nothing is painted.
  function exportMask() {
    const src = $('mask-canvas');
    const data = src.getContext('2d').getImageData(0, 0, src.width, src.height);
    const px = data.data;
    let any = false;
    for (let i = 0; i < px.length; i += 4) {
      const v = px[i + 3] >= 128 ? 255 : 0;
      any = any || v === 255;
      px[i] = px[i + 1] = px[i + 2] = v;
      px[i + 3] = 255;
    }
    if (!any) return null;
    const out = document.createElement('canvas');
    out.width = src.width;
    out.height = src.height;
    out.getContext('2d').putImageData(data, 0, 0);
    return out.toDataURL('image/png').split(',')[1];
  }

  // ---------------------------------------------------------------- following a job --------------------------
  // Server-sent events read through fetch (EventSource cannot send an Authorization header); any failure falls
  // back to polling GET /v1/jobs/{id}.
  async function streamJob(id, onUpdate) {
    const res = await api(`v1/jobs/${encodeURIComponent(id)}/events`, { headers: { Accept: 'text/event-stream' } });
    if (!res.ok || !res.body) throw new Error('no event stream');
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    let last = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let text = buf + value;
      let hold = '';
      if (text.endsWith('\r')) { hold = '\r'; text = text.slice(0, -1); } // a \r\n split across chunks
      const blocks = text.replace(/\r\n?/g, '\n').split('\n\n');
      buf = blocks.pop() + hold;
      for (const block of blocks) {
        const data = block.split('\n').filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).replace(/^ /, '')).join('\n');
        if (!data) continue;
        last = JSON.parse(data);
        onUpdate(last);
        if (FINAL.has(last.state)) {
          reader.cancel().catch(() => {});
          return last;
        }
      }
    }
    return last;
  }

  async function pollJob(id, onUpdate) {
    for (;;) {
      const job = await apiJSON(`v1/jobs/${encodeURIComponent(id)}`);
      onUpdate(job);
      if (FINAL.has(job.state)) return job;
      await sleep(500);
    }
  }

  async function followJob(id, onUpdate) {
    try {
      const job = await streamJob(id, onUpdate);
      if (job && FINAL.has(job.state)) return job;
    } catch (err) {
      if (err.status === 404) throw err;
    }
    return pollJob(id, onUpdate);
  }

  // ---------------------------------------------------------------- generating -------------------------------
  function setBusy(busy) {
    $('generate').disabled = busy;
    $('generate').textContent = busy ? 'Generating…' : 'Generate';
    $('cancel').hidden = !busy;
    $('progress-wrap').hidden = !busy;
  }

  function showProgress(job) {
    const bar = $('progress');
    const text = $('progress-text');
    if (job.state === 'queued') {
      bar.removeAttribute('value');
      text.textContent = 'Waiting in the queue…';
    } else {
      bar.value = Math.max(0, Math.min(1, Number(job.progress) || 0));
      text.textContent = job.steps ? `Step ${job.step} of ${job.steps}` : `${Math.round(bar.value * 100)} %`;
    }
    if (job.preview) {
      $('placeholder').hidden = true;
      $('result').replaceChildren();
      $('preview').src = previewSrc(job.preview);
      $('preview').hidden = false;
    }
    updateCard(job);
  }

  async function showResult(job) {
    $('preview').hidden = true;
    const box = $('result');
    box.replaceChildren();
    box.classList.toggle('many', job.images.length > 1);
    for (const im of job.images) {
      const img = document.createElement('img');
      img.alt = `Result, seed ${im.seed}`;
      img.className = 'result-image';
      img.title = 'Click to show its parameters';
      img.addEventListener('click', () => showInfotext(im.infotext));
      box.append(img);
      img.src = await imageSrc(im.url);
    }
    $('placeholder').hidden = job.images.length > 0;
    showInfotext(job.images.length ? job.images[0].infotext : '');
  }

  function showInfotext(text) {
    $('infotext').textContent = text || '';
    $('infotext').hidden = !text;
  }

  async function generate(ev) {
    ev.preventDefault();
    if (state.running) return;
    let body;
    try {
      body = readForm();
    } catch (err) {
      status(err.message, 'error');
      return;
    }
    saveForm();
    setBusy(true);
    showProgress({ state: 'queued' });
    status('Sending…');
    const started = performance.now();
    try {
      const job = await apiJSON('v1/jobs', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      state.running = job.id;
      status('Queued');
      addCard(job, true);
      const last = await followJob(job.id, (j) => {
        if (j.state === 'running') status('Running');
        showProgress(j);
      });
      updateCard(last);
      const secs = ((performance.now() - started) / 1000).toFixed(1);
      if (last.state === 'done') {
        await showResult(last);
        status(`Done in ${secs} s (seed ${last.params && last.params.seed})`, 'ok');
      } else if (last.state === 'failed') {
        $('preview').hidden = true;
        status(`Failed: ${last.error || 'unknown error'}`, 'error');
      } else {
        $('preview').hidden = true;
        status(last.state === 'cancelled' ? 'Cancelled' : `Stopped (${last.state})`);
      }
    } catch (err) {
      // The server names the field first in a 422 ("steps: ..."): mark that input.
      const field = err.status === 422 && /^(\w+)[.:]/.exec(err.message);
      if (field && FIELDS[field[1]]) $(FIELDS[field[1]]).setAttribute('aria-invalid', 'true');
      status(err.message, 'error');
    } finally {
      state.running = null;
      setBusy(false);
    }
  }

  async function cancel() {
    if (!state.running) return;
    try {
      await apiJSON(`v1/jobs/${encodeURIComponent(state.running)}`, { method: 'DELETE' });
      status('Cancelling…');
    } catch (err) {
      status(err.message, 'error');
    }
  }

  // ---------------------------------------------------------------- the history ------------------------------
  function describe(job) {
    const p = job.params || {};
    const sampler = state.samplers.find((s) => s.name === p.sampler);
    const parts = [
      job.mode && job.mode !== 'txt2img' ? job.mode : null,
      sampler ? sampler.label : p.sampler,
      p.steps != null ? `${p.steps} steps` : null,
      p.cfg_scale != null ? `CFG ${p.cfg_scale}` : null,
      p.cfg_start ? `CFG start ${p.cfg_start}` : null,
      p.seed != null ? `seed ${p.seed}` : null,
      p.width && p.height ? `${p.width}×${p.height}` : null,
      p.batch_size > 1 ? `batch ${p.batch_size}` : null,
      job.mode !== 'txt2img' && p.strength != null ? `strength ${p.strength}` : null,
      job.model || null,
      job.created ? new Date(job.created).toLocaleString() : null,
    ];
    return parts.filter(Boolean).join(' · ');
  }

  function addCard(job, atTop) {
    if (state.cards.has(job.id)) return updateCard(job);
    const li = $('job-template').content.firstElementChild.cloneNode(true);
    li.id = `job-${job.id}`;
    li.dataset.jobId = job.id;
    li.querySelector('.use-settings').addEventListener('click', () => {
      const p = { ...(li.job.params || {}), mode: li.job.mode };
      if (p.mode !== 'txt2img' && !state.hasImage) p.mode = 'txt2img';
      applyParams(p);
      saveForm();
      status('Settings loaded from the history');
      $('prompt').focus();
    });
    li.querySelector('.to-img2img').addEventListener('click', () => {
      const im = (li.job.images || [])[0];
      if (im) imageToInput(im.url).catch((err) => status(err.message, 'error'));
    });
    li.querySelector('.delete').addEventListener('click', () => deleteJob(li));
    state.cards.set(job.id, li);
    if (atTop) {
      $('gallery').prepend(li);
      state.galleryOffset += 1;
      state.galleryTotal += 1;
      showCount();
    } else {
      $('gallery').append(li);
    }
    updateCard(job);
    return li;
  }

  function updateCard(job) {
    const li = state.cards.get(job.id);
    if (!li) return;
    const before = li.job;
    li.job = { ...(before || {}), ...job };
    const j = li.job;
    li.dataset.state = j.state;
    li.querySelector('.job-prompt').textContent = (j.params && j.params.prompt) || '(no prompt)';
    li.querySelector('.job-meta').textContent = describe(j);
    const err = li.querySelector('.job-error');
    err.textContent = j.error || (FINAL.has(j.state) && j.state !== 'done' ? j.state : '');
    err.hidden = !err.textContent;
    const thumbs = li.querySelector('.thumbs');
    const images = j.images || [];
    const known = thumbs.dataset.images || '';
    const ids = images.map((im) => im.id).join(',');
    if (images.length && known !== ids) {
      thumbs.dataset.images = ids;
      renderThumbs(li, images);
    } else if (!images.length) {
      thumbs.replaceChildren();
      const ph = document.createElement('div');
      ph.className = 'thumb-placeholder';
      if (j.state === 'running' && j.preview) {
        const img = document.createElement('img');
        img.alt = 'Preview';
        img.src = previewSrc(j.preview);
        ph.append(img);
      } else {
        ph.textContent = j.state === 'queued' ? 'queued'
          : j.state === 'running' ? `${Math.round((Number(j.progress) || 0) * 100)} %` : j.state;
      }
      thumbs.append(ph);
    }
    li.querySelector('.to-img2img').hidden = !images.length;
    if (!FINAL.has(j.state) && j.id !== state.running) watchCard(j.id);
  }

  async function renderThumbs(li, images) {
    const thumbs = li.querySelector('.thumbs');
    thumbs.replaceChildren();
    const actions = li.querySelector('.job-actions');
    for (const a of actions.querySelectorAll('a.download')) if (!a.hidden) a.remove();
    const template = actions.querySelector('a.download');
    for (const [k, im] of images.entries()) {
      const btn = document.createElement('button');
      btn.type = 'button';
      btn.className = 'thumb';
      btn.title = 'Show this image';
      const img = document.createElement('img');
      img.alt = `${(li.job.params && li.job.params.prompt) || 'image'} (seed ${im.seed})`;
      img.loading = 'lazy';
      img.decoding = 'async';
      btn.append(img);
      btn.addEventListener('click', () => showImage(im));
      thumbs.append(btn);
      const a = template.cloneNode(true);
      a.hidden = false;
      a.textContent = images.length > 1 ? `Download ${k + 1}` : 'Download';
      a.download = `estable-${im.seed}-${im.id}.png`;
      actions.insertBefore(a, template);
      try {
        const src = await imageSrc(im.url);
        img.src = src;
        a.href = src;
      } catch (err) {
        btn.title = err.message;
      }
    }
  }

  async function showImage(im) {
    $('placeholder').hidden = true;
    $('preview').hidden = true;
    const img = document.createElement('img');
    img.alt = `Image, seed ${im.seed}`;
    img.className = 'result-image';
    $('result').classList.remove('many');
    $('result').replaceChildren(img);
    showInfotext(im.infotext);
    img.src = await imageSrc(im.url);
  }

  // A job that was queued or running when the page loaded (another tab, a reload) updates its card as it goes.
  function watchCard(id) {
    if (state.watched.has(id)) return;
    state.watched.add(id);
    followJob(id, updateCard)
      .then(updateCard)
      .catch(() => {})
      .finally(() => state.watched.delete(id));
  }

  async function deleteJob(li) {
    const j = li.job;
    const finished = FINAL.has(j.state);
    if (finished && !window.confirm('Delete this job and its images?')) return;
    try {
      const res = await apiJSON(`v1/jobs/${encodeURIComponent(j.id)}`, { method: 'DELETE' });
      if (res.deleted) {
        li.remove();
        state.cards.delete(j.id);
        state.galleryOffset = Math.max(0, state.galleryOffset - 1);
        state.galleryTotal = Math.max(0, state.galleryTotal - 1);
        showCount();
      } else if (res.state) {
        updateCard({ id: j.id, state: res.state });
      }
    } catch (err) {
      if (err.status === 404) li.remove();
      status(err.message, 'error');
    }
  }

  function showCount() {
    const n = state.galleryTotal;
    $('gallery-count').textContent = n === 1 ? '1 job' : `${n} jobs`;
    $('gallery-more').hidden = state.galleryOffset >= n;
  }

  async function loadGallery(reset) {
    if (reset) {
      $('gallery').replaceChildren();
      state.cards.clear();
      state.galleryOffset = 0;
    }
    try {
      const page = await apiJSON(`v1/jobs?limit=${PAGE}&offset=${state.galleryOffset}`);
      state.galleryOffset += page.jobs.length;
      state.galleryTotal = page.total;
      for (const job of page.jobs) addCard(job, false);
      showCount();
      if (!page.total) $('gallery-count').textContent = 'nothing yet';
    } catch (err) {
      status(`Could not load the history: ${err.message}`, 'error');
    }
  }

  // ---------------------------------------------------------------- start ------------------------------------
  // ---------------------------------------------------------------- LoRAs, embeddings, ControlNet ------------
  function addToPrompt(text) {
    const p = $('prompt');
    p.value = p.value.trim() ? `${p.value.trimEnd()} ${text}` : text;
    p.focus();
    saveForm();
  }

  async function loadExtras() {
    const get = (path) => apiJSON(path).catch(() => null);
    const [loras, embeddings, controlnets] = await Promise.all([
      get('sdapi/v1/loras'), get('sdapi/v1/embeddings'), get('controlnet/model_list?update=false')]);
    const loraNames = (loras || []).map((l) => l.name).sort();
    const embeddingNames = Object.keys((embeddings && embeddings.loaded) || {}).sort();
    const netNames = (controlnets && controlnets.model_list) || [];
    $('lora-pick').append(...loraNames.map((n) => new Option(n, n)));
    $('embedding-pick').append(...embeddingNames.map((n) => new Option(n, n)));
    $('control-model').append(...netNames.map((n) => new Option(n, n)));
    $('lora-field').hidden = !loraNames.length;
    $('embedding-field').hidden = !embeddingNames.length;
    $('extras').hidden = !loraNames.length && !embeddingNames.length;
    $('control-section').hidden = !netNames.length;
  }

  function onControlFile() {
    const file = $('control-image').files[0];
    state.controlImage = null;
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => { state.controlImage = String(reader.result).split(',')[1]; };
    reader.onerror = () => status('Could not read that image', 'error');
    reader.readAsDataURL(file);
  }

  async function start() {
    $('gen-form').addEventListener('submit', generate);
    $('cancel').addEventListener('click', cancel);
    for (const r of document.querySelectorAll('input[name="mode"]')) r.addEventListener('change', () => {
      updateMode();
      saveForm();
    });
    $('gen-form').addEventListener('change', saveForm);
    $('prompt').addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) $('gen-form').requestSubmit();
    });
    $('seed-dice').addEventListener('click', () => {
      const r = new Uint32Array(1);
      crypto.getRandomValues(r);
      $('seed').value = r[0];
      saveForm();
    });
    $('seed-random').addEventListener('click', () => { $('seed').value = -1; saveForm(); });
    $('swap-size').addEventListener('click', () => {
      const w = $('width').value;
      $('width').value = $('height').value;
      $('height').value = w;
      saveForm();
    });
    for (const id of ['width', 'height']) {
      $(id).addEventListener('change', () => {
        const v = Number($(id).value);
        if (Number.isFinite(v) && v > 0) $(id).value = Math.max(8, Math.round(v / 8) * 8);
      });
    }
    $('strength').addEventListener('input', () => {
      $('strength-value').textContent = Number($('strength').value).toFixed(2);
    });
    $('init-image').addEventListener('change', onImageFile);
    $('lora-pick').addEventListener('change', () => {
      if ($('lora-pick').value) addToPrompt(`<lora:${$('lora-pick').value}:1>`);
      $('lora-pick').value = '';
    });
    $('embedding-pick').addEventListener('change', () => {
      if ($('embedding-pick').value) addToPrompt($('embedding-pick').value);
      $('embedding-pick').value = '';
    });
    $('control-image').addEventListener('change', onControlFile);
    $('use-image-size').addEventListener('click', () => {
      const lim = (state.config && state.config.limits) || {};
      const fit = (v, max) => Math.max(8, Math.min(max || 2048, Math.floor(v / 8) * 8));
      $('width').value = fit($('image-canvas').width, lim.max_width);
      $('height').value = fit($('image-canvas').height, lim.max_height);
      saveForm();
    });
    $('gallery-more').addEventListener('click', () => loadGallery(false));
    $('gallery-refresh').addEventListener('click', () => loadGallery(true));
    $('forget-key').hidden = !apiKey();
    $('forget-key').addEventListener('click', () => {
      sessionStorage.removeItem(KEY_STORE);
      $('forget-key').hidden = true;
      status('The API key is forgotten; the next request asks for it again.');
    });
    setupBrush();
    updateMode();

    try {
      const [config, samplers] = await Promise.all([apiJSON('v1/config'), apiJSON('v1/samplers')]);
      state.config = config;
      state.samplers = samplers.samplers || [];
      $('sampler').replaceChildren(...state.samplers.map((s) => new Option(s.label || s.name, s.name)));
      const lim = config.limits || {};
      if (lim.max_steps) $('steps').max = lim.max_steps;
      if (lim.max_width) $('width').max = lim.max_width;
      if (lim.max_height) $('height').max = lim.max_height;
      if (lim.max_batch_size) $('batch-size').max = lim.max_batch_size;
      if (lim.max_prompt_length) $('prompt').maxLength = lim.max_prompt_length;
      const completion = (config.defaults || {}).prompt_completion;
      $('complete-prompt-row').hidden = !completion;
      $('complete-prompt-name').textContent = completion ? `(${completion})` : '';
      applyParams(config.defaults || {});
    } catch (err) {
      status(`Could not reach the server: ${err.message}`, 'error');
    }
    try {
      const saved = JSON.parse(localStorage.getItem(FORM_STORE) || 'null');
      if (saved) {
        if (saved.mode !== 'txt2img') saved.mode = 'txt2img'; // the input image is not kept across loads
        applyParams(saved);
      }
    } catch (_) { /* a broken saved form is ignored */ }
    apiJSON('v1/models').then((m) => {
      const cur = (m.models || []).find((x) => x.current) || (m.models || [])[0];
      $('model-name').textContent = cur ? cur.name : '';
      if (cur && cur.hash) $('model-name').title = `model ${cur.name}, hash ${cur.hash}`;
    }).catch(() => { $('model-name').textContent = ''; });
    await Promise.all([loadGallery(true), loadExtras()]);
    document.body.dataset.ready = 'true';
  }

  document.addEventListener('DOMContentLoaded', start);
})();
