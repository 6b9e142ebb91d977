// The rater page: keyboard and mouse answers, one POST per item, then the next item.
// No build step; no library. The token is the last part of the page's path (/r/<token>).
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("page-data").textContent);
  var token = decodeURIComponent(window.location.pathname.split("/").pop());
  var questions = {};
  data.questions.forEach(function (q) { questions[q.id] = q; });
  var cells = data.cells.map(function (c) {
    var el = document.querySelector('.cell[data-question="' + c[0] + '"][data-slot="' + c[1] + '"]');
    return { question: c[0], slot: c[1], el: el, value: null };
  });
  var cur = 0;
  var sending = false;
  var submit = document.getElementById("submit");
  var status = document.getElementById("status");

  function complete() { return cells.every(function (c) { return c.value !== null; }); }

  function render() {
    cells.forEach(function (c, i) {
      c.el.classList.toggle("current", i === cur);
      c.el.classList.toggle("answered", c.value !== null);
      Array.prototype.forEach.call(c.el.querySelectorAll("button"), function (b) {
        b.setAttribute("aria-pressed", String(c.value !== null && Number(b.dataset.value) === c.value));
      });
    });
    submit.disabled = !complete() || sending;
  }

  function set(i, v) {
    cells[i].value = v;
    // move on to the next unanswered cell (after this one, then from the start)
    for (var k = 1; k <= cells.length; k++) {
      var j = (i + k) % cells.length;
      if (cells[j].value === null) { cur = j; render(); return; }
    }
    cur = i;
    render();
  }

  function keyValue(q, e) {
    var k = e.key;
    if (q.kind === "binary") {
      if (k === "a" || k === "A" || k === "y" || k === "Y") return 1;
      if (k === "r" || k === "R" || k === "n" || k === "N") return 0;
      return null;
    }
    if (q.kind === "choice") {
      if (data.slots === 2 && k === "ArrowLeft") return 0;
      if (data.slots === 2 && k === "ArrowRight") return 1;
      if (/^[1-9]$/.test(k) && Number(k) <= data.slots) return Number(k) - 1;
      return null;
    }
    if (/^[0-9]$/.test(k)) {
      var v = Number(k);
      if (v === 0 && q.max === 10) v = 10;
      if (v >= q.min && v <= q.max) return v;
    }
    return null;
  }

  function send() {
    if (!complete() || sending) return;
    sending = true;
    render();
    status.textContent = "Saving...";
    fetch("/api/answer", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Authorization": "Bearer " + token },
      body: JSON.stringify({
        item: data.item,
        answers: cells.map(function (c) { return { question: c.question, slot: c.slot, value: c.value }; })
      })
    }).then(function (r) {
      return r.json().then(function (body) { return { ok: r.ok, code: r.status, body: body }; });
    }).then(function (res) {
      if (res.ok || res.code === 409) {
        window.location.reload();
      } else {
        sending = false;
        status.textContent = "Not saved: " + (res.body && res.body.error ? res.body.error : res.code);
        render();
      }
    }).catch(function () {
      sending = false;
      status.textContent = "Not saved: the server cannot be reached; try again.";
      render();
    });
  }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "Enter") { e.preventDefault(); send(); return; }
    if (e.key === "ArrowDown") { e.preventDefault(); cur = Math.min(cur + 1, cells.length - 1); render(); return; }
    if (e.key === "ArrowUp") { e.preventDefault(); cur = Math.max(cur - 1, 0); render(); return; }
    var v = keyValue(questions[cells[cur].question], e);
    if (v !== null) { e.preventDefault(); set(cur, v); }
  });

  cells.forEach(function (c, i) {
    c.el.addEventListener("click", function (e) {
      var b = e.target.closest("button");
      if (!b || b.dataset.value === undefined) return;
      set(i, Number(b.dataset.value));
    });
  });
  submit.addEventListener("click", send);
  render();
})();
