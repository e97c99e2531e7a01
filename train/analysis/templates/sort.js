// Sort the latent table by a column: numbers by data-v (empty last), text by its content.
document.querySelectorAll("#latents th[data-type]").forEach((th, col) => {
  th.addEventListener("click", () => {
    const desc = !th.classList.contains("desc");
    document.querySelectorAll("#latents th").forEach(h => h.classList.remove("asc", "desc"));
    th.classList.add(desc ? "desc" : "asc");
    const body = document.querySelector("#latents tbody");
    const key = tr => {
      const td = tr.children[th.cellIndex];
      return th.dataset.type === "num" ? parseFloat(td.dataset.v) : td.textContent;
    };
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (th.dataset.type === "num") {
        if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y);
        return desc ? y - x : x - y;
      }
      return desc ? y.localeCompare(x) : x.localeCompare(y);
    });
    rows.forEach(r => body.appendChild(r));
  });
});
